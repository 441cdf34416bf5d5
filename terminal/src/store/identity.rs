//! The till's identity in its own database: the key space its sales are delivered under, the
//! device nonce, and the moves of unsent sales from one key space to another.
//!
//! A sale's idempotency key is `(terminal_id, pos_id, local_event_id)`. The *key space* is the
//! pair `(terminal, branch, pos_id)` that new sales are stamped with; the outbox delivers only
//! rows of the current key space (a row of another would be refused as a stranger, 403, and
//! take its whole batch down with it). The key space changes in two ways:
//!
//! - **re-enrollment as another terminal or branch** ([`fork_in`] from `save_enrollment`): the
//!   new token cannot deliver the old terminal's keys;
//! - **a fork** ([`fork`]) when the cloud says this `pos_id` is used by another database
//!   (`POS_SYNC_POS_CLONED`, or a conflict: same key, different payload) — a cloned disk or a
//!   restored backup.
//!
//! Either way a fresh `pos_id` starts at `local_event_id` 1, and the unsent rows of the old key
//! space wait for a *carry-over*: the till asks the cloud which of their old keys it already
//! holds with the same payload hash (those are marked synced — the cloud has that very sale)
//! and re-keys the rest into the current key space, numbered in their original order.
//! [`apply_carry_over`] re-keys a row only if it is still exactly as it was when the cloud was
//! asked (same status, attempts and `updated_at`), so a row whose delivery was meanwhile
//! answered is never re-keyed on stale information — that is what keeps a sale from being
//! stored under both keys.
//!
//! The device nonce is regenerated whenever the database file is not the file that created it
//! (another inode or creation time, another machine id): a copied data directory or a restored backup.
//! The copy then forks at once ([`ChangeReason::Copied`]): its own new sales get a fresh
//! `pos_id`, while the unsent sales it *inherited* (recorded before the copy, identical in both
//! databases) keep their keys and are delivered with the *old* nonce ([`Inherited`]). Whichever
//! database delivers an inherited sale first, the other's delivery is a duplicate of the same
//! key with the same payload: exactly once, with no race between the two. That holds only
//! because an inherited row is never re-keyed — not even when the copy is enrolled as another
//! terminal and can no longer deliver it (the cloud cannot tell us whether the original will
//! deliver it later, so such a row is left to the original). Only when the copy
//! cannot tell (an image with the same inode and machine id) does the cloud find out — from a
//! second nonce on one `pos_id` or from a conflict — and the fork happens on its answer.

use chrono::{DateTime, Utc};
use possync_actors::TerminalCode;
use possync_protocol::{ErrorCode, SaleEvent};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};
use std::path::Path;
use uuid::Uuid;

use super::error::TerminalStoreError;
use super::journal::{chain_link, take_local_event_id};
use super::{read_enrollment, time_text, Kv};

/// How many identity changes the store remembers for the status page.
pub const CHANGES_KEPT: usize = 20;

/// Journal codes that say "the sale is fine, its key is not": such rows go back to `pending`
/// when they are re-keyed. Any other `needs_attention` row (e.g. `POS_SYNC_EVENT_INVALID`)
/// keeps its state and code under the new key, so an operator retry can deliver it.
const KEY_PROBLEMS: [TerminalCode; 4] = [
    TerminalCode::Api(ErrorCode::PosSyncUnauthorized),
    TerminalCode::Api(ErrorCode::PosSyncPosCloned),
    TerminalCode::Api(ErrorCode::PosSyncEventDuplicate),
    TerminalCode::AttemptsExhausted,
];

/// The key space new sales are stamped with and the outbox delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpace {
    /// The enrolled terminal.
    pub terminal_id: Uuid,
    /// Its branch.
    pub branch_id: String,
    /// The current `pos_id`.
    pub pos_id: Uuid,
}

/// Why a till's key space changed, recorded for the status page and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeReason {
    /// Enrolled as another terminal or branch.
    Reenrolled,
    /// The cloud bound this `pos_id` to another device (`POS_SYNC_POS_CLONED`).
    Cloned,
    /// The cloud holds one of this `pos_id`'s keys with another payload (restored backup or an
    /// image cloned before device nonces).
    Conflict,
    /// Unsent sales of an earlier key space were moved into the current one.
    CarryOver,
    /// The database file is a copy or a restore (see [`ensure_device_nonce`]).
    Copied,
}

/// Sales this database inherited from the database it was copied from: rows of `pos_id` with
/// `local_event_id < below`. They keep their keys for good and are delivered with that
/// database's device nonce, because the original may deliver the very same sales: never
/// re-keyed by a carry-over, and delivered by this database only while it is enrolled as the
/// terminal and branch they name (a copy enrolled as another terminal leaves them to the
/// original).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inherited {
    /// The original's `pos_id`.
    pub pos_id: Uuid,
    /// The original's device nonce.
    pub nonce: Uuid,
    /// The first `local_event_id` the copy itself would have given.
    pub below: i64,
}

/// Every inheritance recorded (a copy of a copy has two).
pub fn inherited(conn: &Connection) -> Result<Vec<Inherited>, TerminalStoreError> {
    match Kv::SyncState.get(conn, "inherited")? {
        None => Ok(Vec::new()),
        Some(text) => Ok(serde_json::from_str(&text)?),
    }
}

/// One change of the till's key space, newest last in [`changes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityChange {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Why.
    pub reason: ChangeReason,
    /// The `pos_id` before (for a carry-over: where the rows came from).
    pub from_pos_id: Uuid,
    /// The `pos_id` after.
    pub to_pos_id: Uuid,
    /// Rows re-keyed (carry-over only).
    pub rekeyed: usize,
    /// Rows the cloud already held under the old key, marked synced (carry-over only).
    pub already_held: usize,
}

/// An unsent row of an earlier key space, as it was when read.
#[derive(Debug, Clone, PartialEq)]
pub struct CarryCandidate {
    /// The row.
    pub journal_id: i64,
    /// The `pos_id` it was stamped with.
    pub pos_id: Uuid,
    /// Its old `local_event_id`.
    pub local_event_id: i64,
    /// The terminal it was stamped with (`None`: queued before any enrollment, never sent).
    pub terminal_id: Option<Uuid>,
    /// `SaleEvent::payload_hash` of the stored event (`None` when never sendable).
    pub payload_hash: Option<String>,
    /// Guard: the row is re-keyed only if these are unchanged.
    pub status: String,
    /// Guard.
    pub attempts: i64,
    /// Guard.
    pub updated_at: String,
}

/// What the carry-over decided for one candidate.
#[derive(Debug, Clone, PartialEq)]
pub enum CarryDecision {
    /// The cloud holds this very sale under the old key: mark the row synced.
    AlreadyHeld {
        /// The row, as read.
        row: CarryCandidate,
        /// The cloud's id of the stored sale.
        cloud_event_id: Uuid,
    },
    /// Not in the cloud under the old key (or another sale is): give it a key of the current
    /// key space.
    Rekey {
        /// The row, as read.
        row: CarryCandidate,
    },
}

/// What [`apply_carry_over`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CarryOverCounts {
    /// Rows re-keyed into the current key space.
    pub rekeyed: usize,
    /// Rows marked synced because the cloud already held them.
    pub already_held: usize,
    /// Rows that changed since they were read (left for the next pass).
    pub skipped: usize,
}

/// A stable fingerprint of the database file on this machine: its inode and creation time,
/// plus the machine id when there is one. A copy or a restore into a new file differs in both.
/// The device number is left out on purpose: overlay filesystems (containers) may report a new
/// one after every remount, which would make every restart look like a copy.
pub fn file_fingerprint(path: &Path) -> String {
    let file = std::fs::metadata(path)
        .map(|m| {
            let born = m
                .created()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos().to_string())
                .unwrap_or_default();
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                format!("{}:{born}", m.ino())
            }
            #[cfg(not(unix))]
            {
                born
            }
        })
        .unwrap_or_default();
    let machine = std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{file}/{machine}")
}

/// Reads the device nonce, creating a new one when there is none or the database file is not
/// the one that created it.
pub fn ensure_device_nonce(conn: &mut Connection, path: &Path) -> Result<Uuid, TerminalStoreError> {
    let fingerprint = file_fingerprint(path);
    let stored_print = Kv::SyncState.get(conn, "device_fingerprint")?;
    let stored_nonce = Kv::SyncState.get(conn, "device_nonce")?;
    if let (Some(p), Some(n)) = (&stored_print, &stored_nonce) {
        if *p == fingerprint {
            return Uuid::parse_str(n)
                .map_err(|e| TerminalStoreError::Corrupt(format!("device_nonce {n:?}: {e}")));
        }
    }
    let nonce = Uuid::new_v4();
    let tx = conn.transaction()?;
    Kv::SyncState.set(&tx, "device_nonce", &nonce.to_string())?;
    Kv::SyncState.set(&tx, "device_fingerprint", &fingerprint)?;
    let previous = stored_nonce
        .as_deref()
        .and_then(|n| Uuid::parse_str(n).ok());
    if let Some(old_nonce) = previous {
        let mut all = inherited(&tx)?;
        all.push(Inherited {
            pos_id: pos_id(&tx)?,
            nonce: old_nonce,
            below: Kv::SyncState
                .get_i64(&tx, "next_local_event_id")?
                .unwrap_or(1),
        });
        Kv::SyncState.set(&tx, "inherited", &serde_json::to_string(&all)?)?;
        fork_in(&tx, ChangeReason::Copied)?;
    }
    tx.commit()?;
    if previous.is_some() {
        tracing::warn!(
            device = %nonce,
            "database file is a copy or a restore (not the file that created the device nonce): new device nonce and pos_id; inherited unsent sales keep their keys"
        );
    }
    Ok(nonce)
}

/// The stored `pos_id`.
pub fn pos_id(conn: &Connection) -> Result<Uuid, TerminalStoreError> {
    let text = Kv::SyncState
        .get(conn, "pos_id")?
        .ok_or_else(|| TerminalStoreError::Corrupt("pos_id missing".into()))?;
    Uuid::parse_str(&text).map_err(|e| TerminalStoreError::Corrupt(format!("pos_id {text:?}: {e}")))
}

/// The current key space, `None` before enrollment.
pub fn key_space(conn: &Connection) -> Result<Option<KeySpace>, TerminalStoreError> {
    let Some(e) = read_enrollment(conn)? else {
        return Ok(None);
    };
    Ok(Some(KeySpace {
        terminal_id: e.terminal_id,
        branch_id: e.branch_id,
        pos_id: pos_id(conn)?,
    }))
}

/// The remembered identity changes, oldest first.
pub fn changes(conn: &Connection) -> Result<Vec<IdentityChange>, TerminalStoreError> {
    match Kv::SyncState.get(conn, "identity_changes")? {
        None => Ok(Vec::new()),
        Some(text) => Ok(serde_json::from_str(&text)?),
    }
}

fn record_change(tx: &Transaction<'_>, change: IdentityChange) -> Result<(), TerminalStoreError> {
    let mut all = changes(tx)?;
    all.push(change);
    let excess = all.len().saturating_sub(CHANGES_KEPT);
    all.drain(..excess);
    Kv::SyncState.set(tx, "identity_changes", &serde_json::to_string(&all)?)?;
    Ok(())
}

/// Starts a fresh `pos_id` (numbered from 1) inside the caller's transaction and records why.
/// Returns the new `pos_id`.
pub fn fork_in(tx: &Transaction<'_>, reason: ChangeReason) -> Result<Uuid, TerminalStoreError> {
    let from = pos_id(tx)?;
    let to = Uuid::new_v4();
    Kv::SyncState.set(tx, "pos_id", &to.to_string())?;
    Kv::SyncState.set(tx, "next_local_event_id", "1")?;
    record_change(
        tx,
        IdentityChange {
            at: Utc::now(),
            reason,
            from_pos_id: from,
            to_pos_id: to,
            rekeyed: 0,
            already_held: 0,
        },
    )?;
    tracing::warn!(fromPosId = %from, posId = %to, ?reason, "till forked to a new pos_id; unsent sales of the old one are carried over");
    Ok(to)
}

/// Whether the cloud said, for a row of the current key space, that the `pos_id` is used by
/// another database: such a row is `needs_attention` with `POS_SYNC_POS_CLONED`, or with
/// `POS_SYNC_EVENT_DUPLICATE` (a conflict: a duplicate is `synced`). Returns the reason.
pub fn fork_needed(conn: &Connection) -> Result<Option<ChangeReason>, TerminalStoreError> {
    let Some(ks) = key_space(conn)? else {
        return Ok(None);
    };
    let code: Option<String> = conn
        .query_row(
            "SELECT last_error_code FROM sync_journal
             WHERE status = 'needs_attention' AND pos_id = ?1
               AND last_error_code IN (?2, ?3)
             ORDER BY last_error_code DESC LIMIT 1",
            params![
                ks.pos_id.to_string(),
                ErrorCode::PosSyncPosCloned.as_str(),
                ErrorCode::PosSyncEventDuplicate.as_str()
            ],
            |r| r.get(0),
        )
        .optional()?;
    Ok(code.map(|c| {
        if TerminalCode::parse(&c) == Some(TerminalCode::Api(ErrorCode::PosSyncPosCloned)) {
            ChangeReason::Cloned
        } else {
            ChangeReason::Conflict
        }
    }))
}

/// Forks if [`fork_needed`] still says so, in one transaction. Returns the new `pos_id`.
pub fn fork(conn: &mut Connection) -> Result<Option<Uuid>, TerminalStoreError> {
    let tx = conn.transaction()?;
    let Some(reason) = fork_needed(&tx)? else {
        return Ok(None);
    };
    let to = fork_in(&tx, reason)?;
    tx.commit()?;
    Ok(Some(to))
}

/// How far [`carry_candidates`] looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CarryScope {
    /// Rows of other `pos_id`s only: a column comparison per unsent row, cheap enough for
    /// every pass even with a long outage's queue. Sufficient because every change of terminal
    /// or branch starts a new `pos_id` ([`fork_in`] in `save_enrollment`), so rows of the
    /// current `pos_id` always carry the current terminal and branch.
    OtherPosIds,
    /// Also rows of the current `pos_id` stamped with another terminal or branch, which only a
    /// build from before till identity could leave (it re-enrolled without a new `pos_id`).
    /// Reads every unsent row's JSON: once per daemon start and per enrollment.
    Everything,
}

/// Unsent rows outside the current key space (not `in_flight`: a delivery may be under way),
/// oldest first, never an inherited row (see [`Inherited`]). Empty before enrollment.
pub fn carry_candidates(
    conn: &Connection,
    scope: CarryScope,
) -> Result<Vec<CarryCandidate>, TerminalStoreError> {
    let Some(ks) = key_space(conn)? else {
        return Ok(Vec::new());
    };
    // An inherited row (a sale the database this one was copied from recorded before the
    // copy) is never a candidate, whatever its state and whoever this till is enrolled as now.
    // The original holds the very same row under the very same key and may deliver it at any
    // time, later than any answer `held` gives us: re-keying it here would let the cloud store
    // one sale under two keys. Its key is the one thing both databases agree on, so it is
    // delivered under that key or not at all — by this till while it is enrolled as the
    // terminal and branch the row names (`claim_batch`), otherwise only by the original.
    // Cheap terms first: a row of the current pos_id is looked into (its JSON) only in a
    // thorough pass; the inherited list is usually empty.
    let mut stmt = conn.prepare_cached(
        "SELECT journal_id, pos_id, local_event_id, event, status, attempts, updated_at
         FROM sync_journal
         WHERE status IN ('pending', 'failed', 'needs_attention')
           AND (pos_id <> ?1
                OR (?5 AND (json_extract(event, '$.terminal_id') IS NOT ?2
                            OR json_extract(event, '$.branch_id') IS NOT ?3)))
           AND NOT EXISTS (SELECT 1 FROM json_each(?4) i
                           WHERE json_extract(i.value, '$.pos_id') = sync_journal.pos_id
                             AND sync_journal.local_event_id < json_extract(i.value, '$.below'))
           AND NOT (updated_at > ?6
                    AND (coalesce(last_error_code, '') IN ('NETWORK', 'BAD_RESPONSE')
                         OR coalesce(last_error_code, '') LIKE 'HTTP!_%' ESCAPE '!'))
         ORDER BY journal_id",
    )?;
    let inherited = serde_json::to_string(&inherited(conn)?)?;
    let quiet_since = Utc::now()
        .checked_sub_signed(chrono::TimeDelta::seconds(UNANSWERED_QUIET_SECS))
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    candidates_of(
        &mut stmt,
        params![
            ks.pos_id.to_string(),
            ks.terminal_id.to_string(),
            ks.branch_id,
            inherited,
            scope == CarryScope::Everything,
            time_text(quiet_since)
        ],
    )
}

/// How long a row whose last delivery went unanswered (`NETWORK`, `BAD_RESPONSE`,
/// `HTTP_<status>` from a proxy) is left out of the carry-over. Its request may still be
/// committing in the cloud: the till gave up after its 60 s request timeout, a proxy answered
/// 504 for an upstream still at work, or the connection broke after the body was sent. `held`
/// read before that commit would not list the key, the row would be re-keyed, and the sale
/// stored under two keys. The cloud bounds its own work per request (a 30 s statement timeout
/// on PostgreSQL, 5 s busy wait on SQLite, per group commit), so three minutes after the last
/// unanswered attempt the old request has committed or never will, and `held` tells which.
/// Rows the cloud answered (refused, a credential refusal, its own 5xx) or never sent are
/// carried at once.
pub const UNANSWERED_QUIET_SECS: i64 = 180;

/// Inherited rows this till will never deliver: stamped with another terminal or branch than
/// the one it is enrolled as (a copy enrolled as another terminal; see [`Inherited`]). They
/// are the original's to deliver, under their own keys. Once the cloud holds one with the same
/// payload it is marked synced here too (`carry_over::settle_inherited`, only `AlreadyHeld`
/// decisions are applied to these rows), so the copy's queue does not carry the original's
/// sales as a backlog of its own for ever. Empty before enrollment or without an inheritance.
pub fn inherited_left_to_original(
    conn: &Connection,
) -> Result<Vec<CarryCandidate>, TerminalStoreError> {
    let Some(ks) = key_space(conn)? else {
        return Ok(Vec::new());
    };
    let inherited = inherited(conn)?;
    if inherited.is_empty() {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare_cached(
        "SELECT journal_id, pos_id, local_event_id, event, status, attempts, updated_at
         FROM sync_journal
         WHERE status IN ('pending', 'failed', 'needs_attention')
           AND EXISTS (SELECT 1 FROM json_each(?1) i
                       WHERE json_extract(i.value, '$.pos_id') = sync_journal.pos_id
                         AND sync_journal.local_event_id < json_extract(i.value, '$.below'))
           AND (json_extract(event, '$.terminal_id') IS NOT ?2
                OR json_extract(event, '$.branch_id') IS NOT ?3)
         ORDER BY journal_id",
    )?;
    candidates_of(
        &mut stmt,
        params![
            serde_json::to_string(&inherited)?,
            ks.terminal_id.to_string(),
            ks.branch_id
        ],
    )
}

/// Reads `journal_id, pos_id, local_event_id, event, status, attempts, updated_at` rows as
/// candidates.
fn candidates_of(
    stmt: &mut rusqlite::CachedStatement<'_>,
    params: impl rusqlite::Params,
) -> Result<Vec<CarryCandidate>, TerminalStoreError> {
    type Raw = (i64, String, i64, String, String, i64, String);
    let raw: Vec<Raw> = stmt
        .query_map(params, |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    raw.into_iter()
        .map(
            |(journal_id, pos, local_event_id, event, status, attempts, updated_at)| {
                let pos_id = Uuid::parse_str(&pos)
                    .map_err(|e| TerminalStoreError::Corrupt(format!("pos_id {pos:?}: {e}")))?;
                // Rows queued before any enrollment hold null identity fields and were never sent.
                let parsed = serde_json::from_str::<SaleEvent>(&event).ok();
                Ok(CarryCandidate {
                    journal_id,
                    pos_id,
                    local_event_id,
                    terminal_id: parsed.as_ref().map(|e| e.terminal_id),
                    payload_hash: parsed.as_ref().map(SaleEvent::payload_hash),
                    status,
                    attempts,
                    updated_at,
                })
            },
        )
        .collect()
}

/// Applies the carry-over decisions in one transaction (see the module docs for the guard).
pub fn apply_carry_over(
    conn: &mut Connection,
    decisions: &[CarryDecision],
) -> Result<CarryOverCounts, TerminalStoreError> {
    let now = time_text(Utc::now());
    let tx = conn.transaction()?;
    let Some(ks) = key_space(&tx)? else {
        return Ok(CarryOverCounts::default());
    };
    let mut counts = CarryOverCounts::default();
    let mut from_pos: Option<Uuid> = None;
    for d in decisions {
        let row = match d {
            CarryDecision::AlreadyHeld { row, .. } | CarryDecision::Rekey { row } => row,
        };
        // The guard: only a row exactly as it was when the cloud was asked.
        let unchanged: Option<(String, Option<String>)> = tx
            .query_row(
                "SELECT event, last_error_code FROM sync_journal
                 WHERE journal_id = ?1 AND status = ?2 AND attempts = ?3 AND updated_at = ?4
                   AND status IN ('pending', 'failed', 'needs_attention')",
                params![row.journal_id, row.status, row.attempts, row.updated_at],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((event, code)) = unchanged else {
            counts.skipped += 1;
            continue;
        };
        from_pos.get_or_insert(row.pos_id);
        match d {
            CarryDecision::AlreadyHeld { cloud_event_id, .. } => {
                tx.execute(
                    "UPDATE sync_journal SET status = 'synced', cloud_event_id = ?2, synced_at = ?3,
                         updated_at = ?3, next_attempt_at = NULL,
                         last_error_code = ?4, last_error_message = NULL
                     WHERE journal_id = ?1",
                    params![
                        row.journal_id,
                        cloud_event_id.to_string(),
                        now,
                        ErrorCode::PosSyncEventDuplicate.as_str()
                    ],
                )?;
                counts.already_held += 1;
            }
            CarryDecision::Rekey { .. } => {
                let local_event_id = take_local_event_id(&tx)?;
                let mut value: serde_json::Value = serde_json::from_str(&event)?;
                if let Some(obj) = value.as_object_mut() {
                    obj.insert("terminal_id".into(), ks.terminal_id.to_string().into());
                    obj.insert("branch_id".into(), ks.branch_id.clone().into());
                    obj.insert("pos_id".into(), ks.pos_id.to_string().into());
                    obj.insert("local_event_id".into(), local_event_id.into());
                }
                let moved: SaleEvent = serde_json::from_value(value.clone())?;
                let link = chain_link(
                    &tx,
                    ks.pos_id,
                    local_event_id,
                    moved.event_type,
                    moved.occurred_at,
                    &serde_json::to_value(&moved.payload)?,
                )?;
                let keep_parked = row.status == "needs_attention"
                    && !code
                        .and_then(|c| TerminalCode::parse(&c))
                        .is_some_and(|c| KEY_PROBLEMS.contains(&c));
                tx.execute(
                    "UPDATE sync_journal SET pos_id = ?2, local_event_id = ?3, event = ?4, chain_hash = ?7,
                         status = CASE WHEN ?5 THEN status ELSE 'pending' END,
                         attempts = CASE WHEN ?5 THEN attempts ELSE 0 END,
                         last_error_code = CASE WHEN ?5 THEN last_error_code ELSE NULL END,
                         last_error_message = CASE WHEN ?5 THEN last_error_message ELSE NULL END,
                         next_attempt_at = NULL, updated_at = ?6
                     WHERE journal_id = ?1",
                    params![
                        row.journal_id,
                        ks.pos_id.to_string(),
                        local_event_id,
                        serde_json::to_string(&value)?,
                        keep_parked,
                        now,
                        link
                    ],
                )?;
                tracing::info!(
                    terminalId = %ks.terminal_id,
                    branchId = %ks.branch_id,
                    eventId = local_event_id,
                    fromPosId = %row.pos_id,
                    fromEventId = row.local_event_id,
                    posId = %ks.pos_id,
                    journal_id = row.journal_id,
                    "unsent sale re-keyed into the current key space"
                );
                counts.rekeyed += 1;
            }
        }
    }
    if let Some(from) = from_pos {
        record_change(
            &tx,
            IdentityChange {
                at: Utc::now(),
                reason: ChangeReason::CarryOver,
                from_pos_id: from,
                to_pos_id: ks.pos_id,
                rekeyed: counts.rekeyed,
                already_held: counts.already_held,
            },
        )?;
    }
    tx.commit()?;
    Ok(counts)
}

/// Moves rows of the current key space parked only because the token was refused
/// (`POS_SYNC_UNAUTHORIZED`) back to `pending`: a new token makes them deliverable.
pub fn release_unauthorized(tx: &Transaction<'_>) -> Result<usize, TerminalStoreError> {
    let Some(ks) = key_space(tx)? else {
        return Ok(0);
    };
    Ok(tx.execute(
        "UPDATE sync_journal SET status = 'pending', attempts = 0, next_attempt_at = NULL,
             updated_at = ?2
         WHERE status = 'needs_attention' AND pos_id = ?1
           AND last_error_code = ?3",
        params![
            ks.pos_id.to_string(),
            time_text(Utc::now()),
            ErrorCode::PosSyncUnauthorized.as_str()
        ],
    )?)
}
