//! Exactly-once sales ingestion: the idempotency ledger and the append-only sales events.
//!
//! # Why a batch has exactly-once effect
//!
//! A batch is one transaction. It first *claims* keys: a multi-row
//! `INSERT INTO idempotency_ledger … ON CONFLICT DO NOTHING RETURNING key`. The primary key on
//! `(terminal_id, pos_id, local_event_id)` admits one row per key, ever. When two transactions
//! (other connections, other cloud processes) insert the same key, PostgreSQL makes the second
//! wait on the first's uncommitted index entry: if the first commits, the second's insert does
//! nothing; if it rolls back, the second's succeeds. So exactly one transaction claims each
//! key. Only claimed keys get a `sales_events` row, in the same transaction, so a sale is
//! stored iff its key was claimed. Keys not claimed are looked up afterwards; under READ
//! COMMITTED that statement sees the winner's committed row, and its payload hash decides
//! between `Duplicate` (same payload) and `Conflict` (different payload), both answering with
//! the first `cloud_event_id`. SQLite serialises write transactions (`BEGIN IMMEDIATE`), which
//! gives the same result trivially.
//!
//! Any database error aborts the whole transaction — nothing of the batch is stored — and
//! surfaces as [`StoreError::Unavailable`], which the service answers with a retryable 503; the
//! terminal resends the same keys and gets the same answers.
//!
//! Nothing here reads or writes any stock figure: ingestion records what was sold, nothing
//! more.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, NaiveDateTime, Utc};
use diesel::prelude::*;
use possync_protocol::{
    sale_flags, HeldKey, HeldKeysPage, PosIngestion, SaleEvent, SaleFlag, SyncStatus,
};
use uuid::Uuid;

use super::chain_links::{links_to_verify, LinkVerdict, StoredEnd};
use super::schema::{idempotency_ledger, sales_chain_links, sales_event_flags, sales_events};
use super::{for_each_backend, now_utc, read_txn, with_conn, write_txn, DbConn, StoreError};

/// Rows per multi-row INSERT: 200 × 13 columns stays far below SQLite's 32 766 and
/// PostgreSQL's 65 535 bind parameters.
const INSERT_CHUNK: usize = 200;

/// Most ids listed above the first gap in [`sync_status`]; the count is still exact.
pub const MAX_IDS_ABOVE_GAP: usize = 1000;

/// One validated event with its payload hash ([`SaleEvent::payload_hash`]) and flags; the
/// service has already run `validate_event` and checked the key against the token.
#[derive(Debug, Clone)]
pub struct IngestRequest {
    /// The validated event.
    pub event: SaleEvent,
    /// `SaleEvent::payload_hash`, compared on redelivery.
    pub payload_hash: String,
    /// What is odd but storable about it ([`sale_flags`] at receipt), stored with the sale.
    pub flags: Vec<SaleFlag>,
}

impl IngestRequest {
    /// Wraps an already validated event received now, computing its payload hash and flags.
    pub fn new(event: SaleEvent) -> IngestRequest {
        let payload_hash = event.payload_hash();
        let flags = sale_flags(&event, chrono::Utc::now());
        IngestRequest {
            event,
            payload_hash,
            flags,
        }
    }
}

/// What happened to one event of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Stored now, for the first time, under this new id.
    Accepted {
        /// The new sale's id.
        cloud_event_id: Uuid,
        /// Its `chain_hash` does not follow from its (stored) predecessor: a chain break,
        /// recorded with the sale, which is stored anyway.
        chain_break: bool,
    },
    /// Stored before with the same payload; the first ingestion's id.
    Duplicate {
        /// The first ingestion's id.
        cloud_event_id: Uuid,
    },
    /// Stored before with a different payload; the first stays and its id is returned.
    Conflict {
        /// The first ingestion's id (it stays).
        cloud_event_id: Uuid,
    },
    /// The database refused this event on its own (every other event of its group was
    /// committed); nothing of it was stored. Answered `rejected`.
    Refused,
}

impl IngestOutcome {
    /// The `cloud_event_id` of a stored (or earlier stored) event; `None` for a refused one.
    pub fn cloud_event_id(&self) -> Option<Uuid> {
        match *self {
            IngestOutcome::Accepted { cloud_event_id, .. }
            | IngestOutcome::Duplicate { cloud_event_id }
            | IngestOutcome::Conflict { cloud_event_id } => Some(cloud_event_id),
            IngestOutcome::Refused => None,
        }
    }
}

/// The idempotency key in its stored form.
type Key = (String, String, i64);

/// Keys stored by earlier batches → their `(payload_hash, cloud_event_id)`.
type EarlierDeliveries = HashMap<Key, (String, String)>;

/// What the ingest transaction learns: keys it claimed, the earlier deliveries of the rest, and
/// the chain links it verified.
type Claimed = (HashSet<Key>, EarlierDeliveries, Vec<LinkVerdict>);

/// A stored event's chain fields as loaded: `(cloud_event_id, branch_id, pos_id,
/// local_event_id, event_type, occurred_at, payload, chain_hash)`.
type EndRow = (
    String,
    String,
    String,
    i64,
    String,
    NaiveDateTime,
    String,
    Option<String>,
);

#[derive(Debug, Insertable)]
#[diesel(table_name = sales_chain_links)]
struct LinkRow {
    cloud_event_id: String,
    branch_id: String,
    pos_id: String,
    local_event_id: i64,
    intact: bool,
    expected_hash: String,
    verified_at: NaiveDateTime,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = idempotency_ledger)]
struct LedgerRow {
    terminal_id: String,
    pos_id: String,
    local_event_id: i64,
    payload_hash: String,
    cloud_event_id: String,
    branch_id: String,
    first_seen_at: NaiveDateTime,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = sales_event_flags)]
struct FlagRow {
    cloud_event_id: String,
    flag: &'static str,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = sales_events)]
struct SalesRow {
    cloud_event_id: String,
    terminal_id: String,
    pos_id: String,
    local_event_id: i64,
    branch_id: String,
    event_type: String,
    occurred_at: NaiveDateTime,
    received_at: NaiveDateTime,
    payload: String,
    payload_hash: String,
    receipt_no: String,
    total_minor: i64,
    currency: String,
    chain_hash: Option<String>,
}

diesel::alias!(const PREV_EVENTS: Alias<PrevEvents> = sales_events as prev_events);
diesel::alias!(const NEIGHBOUR_KEYS: Alias<NeighbourKeys> = idempotency_ledger as neighbour_keys);

for_each_backend! {
    /// Inserts ledger rows whose key is new; returns the keys inserted.
    pub(super) fn claim(c: &mut Conn, rows: &[LedgerRow]) -> QueryResult<Vec<Key>> {
        ClaimKeys::claim(c, rows)
    }

    pub(super) fn store_sales(c: &mut Conn, rows: &[SalesRow]) -> QueryResult<usize> {
        let mut n = 0;
        for chunk in rows.chunks(INSERT_CHUNK) {
            n += diesel::insert_into(sales_events::table).values(chunk).execute(c)?;
        }
        Ok(n)
    }

    pub(super) fn store_flags(c: &mut Conn, rows: &[FlagRow]) -> QueryResult<usize> {
        let mut n = 0;
        for chunk in rows.chunks(INSERT_CHUNK) {
            n += diesel::insert_into(sales_event_flags::table).values(chunk).execute(c)?;
        }
        Ok(n)
    }

    /// The stored events `(pos_id, local_event_id)` of `keys`, under any terminal.
    pub(super) fn chain_ends(c: &mut Conn, keys: &[(String, i64)]) -> QueryResult<Vec<EndRow>> {
        use sales_events::dsl as s;
        let wanted: HashSet<&(String, i64)> = keys.iter().collect();
        let mut out = Vec::new();
        for chunk in keys.chunks(INSERT_CHUNK) {
            let pos: HashSet<&str> = chunk.iter().map(|k| k.0.as_str()).collect();
            let ids: HashSet<i64> = chunk.iter().map(|k| k.1).collect();
            let rows: Vec<EndRow> = s::sales_events
                .filter(s::pos_id.eq_any(pos))
                .filter(s::local_event_id.eq_any(ids))
                .select((s::cloud_event_id, s::branch_id, s::pos_id, s::local_event_id,
                         s::event_type, s::occurred_at, s::payload, s::chain_hash))
                .load(c)?;
            out.extend(rows.into_iter().filter(|r| wanted.contains(&(r.2.clone(), r.3))));
        }
        Ok(out)
    }

    /// Which of `ids` already have a verified link.
    pub(super) fn linked(c: &mut Conn, ids: &[String]) -> QueryResult<Vec<String>> {
        use sales_chain_links::dsl as l;
        let mut out = Vec::new();
        for chunk in ids.chunks(INSERT_CHUNK) {
            out.extend(
                l::sales_chain_links
                    .filter(l::cloud_event_id.eq_any(chunk))
                    .select(l::cloud_event_id)
                    .load::<String>(c)?,
            );
        }
        Ok(out)
    }

    /// Chained events with ids in `[from, to)` (UUID v7: a time range) that have no verified
    /// link but could have one — the first of their `pos_id`, or one whose predecessor
    /// `(pos_id, local_event_id - 1)` is stored under any terminal, as the chain joins them —
    /// oldest first: `(cloud_event_id, pos_id, local_event_id)`.
    ///
    /// An event whose predecessor never arrived is a gap, not an unverified link: selecting it
    /// would let a till with holes (ids 2, 4, 6, …) fill every `limit`-sized pass with the same
    /// rows, so that links that can be verified never are. The predecessor is found through
    /// `sales_events_pos_idx (pos_id, local_event_id)`.
    pub(super) fn unlinked(
        c: &mut Conn,
        from: &str,
        to: &str,
        limit: i64,
    ) -> QueryResult<Vec<(String, String, i64)>> {
        use sales_chain_links::dsl as l;
        use sales_events::dsl as s;
        s::sales_events
            .filter(s::cloud_event_id.ge(from))
            .filter(s::cloud_event_id.lt(to))
            .filter(s::chain_hash.is_not_null())
            .filter(diesel::dsl::not(diesel::dsl::exists(
                l::sales_chain_links.filter(l::cloud_event_id.eq(s::cloud_event_id)),
            )))
            .filter(s::local_event_id.eq(1).or(diesel::dsl::exists(
                PREV_EVENTS
                    .filter(PREV_EVENTS.field(s::pos_id).eq(s::pos_id))
                    .filter(PREV_EVENTS.field(s::local_event_id).eq(s::local_event_id - 1)),
            )))
            .order(s::cloud_event_id.asc())
            .select((s::cloud_event_id, s::pos_id, s::local_event_id))
            .limit(limit)
            .load(c)
    }

    pub(super) fn store_links(c: &mut Conn, rows: &[LinkRow]) -> QueryResult<usize> {
        let mut n = 0;
        for row in rows {
            // A link verified concurrently by another process (both ends committed at once)
            // keeps its first verdict.
            n += diesel::insert_into(sales_chain_links::table)
                .values(row)
                .on_conflict_do_nothing()
                .execute(c)?;
        }
        Ok(n)
    }

    pub(super) fn flags_of(c: &mut Conn, cloud_event_id: &str) -> QueryResult<Vec<String>> {
        use sales_event_flags::dsl as f;
        f::sales_event_flags
            .filter(f::cloud_event_id.eq(cloud_event_id))
            .order(f::flag.asc())
            .select(f::flag)
            .load(c)
    }

    /// `(key, payload_hash, cloud_event_id)` of the ledger rows of `keys`.
    pub(super) fn first_deliveries(
        c: &mut Conn,
        keys: &[Key],
    ) -> QueryResult<Vec<(Key, String, String)>> {
        use idempotency_ledger::dsl as l;
        let wanted: HashSet<&Key> = keys.iter().collect();
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(INSERT_CHUNK) {
            let terminals: HashSet<&str> = chunk.iter().map(|k| k.0.as_str()).collect();
            let pos: HashSet<&str> = chunk.iter().map(|k| k.1.as_str()).collect();
            let ids: Vec<i64> = chunk.iter().map(|k| k.2).collect();
            let rows: Vec<(String, String, i64, String, String)> = l::idempotency_ledger
                .filter(l::terminal_id.eq_any(terminals))
                .filter(l::pos_id.eq_any(pos))
                .filter(l::local_event_id.eq_any(ids))
                .select((l::terminal_id, l::pos_id, l::local_event_id, l::payload_hash, l::cloud_event_id))
                .load(c)?;
            out.extend(
                rows.into_iter()
                    .map(|(t, p, i, h, id)| ((t, p, i), h, id))
                    .filter(|(k, _, _)| wanted.contains(k)),
            );
        }
        Ok(out)
    }

    /// Per `pos_id` of one terminal: `(pos_id, count, max local_event_id)`.
    pub(super) fn pos_summary(
        c: &mut Conn,
        terminal: &str,
        branch: &str,
    ) -> QueryResult<Vec<(String, i64, Option<i64>)>> {
        use idempotency_ledger::dsl as l;
        l::idempotency_ledger
            .filter(l::terminal_id.eq(terminal))
            .filter(l::branch_id.eq(branch))
            .group_by(l::pos_id)
            .select((l::pos_id, diesel::dsl::count_star(), diesel::dsl::max(l::local_event_id)))
            .order(l::pos_id.asc())
            .load(c)
    }

    /// Stored ids of one `(terminal, branch, pos_id)` above `after`, ascending, at most
    /// `limit` (through the ledger's primary key).
    pub(super) fn ids_above(
        c: &mut Conn,
        key: (&str, &str, &str),
        after: i64,
        limit: i64,
    ) -> QueryResult<Vec<i64>> {
        use idempotency_ledger::dsl as l;
        let (terminal, branch, pos) = key;
        l::idempotency_ledger
            .filter(l::terminal_id.eq(terminal))
            .filter(l::branch_id.eq(branch))
            .filter(l::pos_id.eq(pos))
            .filter(l::local_event_id.gt(after))
            .order(l::local_event_id.asc())
            .select(l::local_event_id)
            .limit(limit)
            .load(c)
    }

    /// Run edges of one `(terminal, branch, pos_id)`: its stored ids above `after` whose
    /// neighbour `id + step` is not stored, ascending, at most `limit`. `step = 1` gives the
    /// last id of each run of consecutive ids, `step = -1` the first. Each probe for the
    /// neighbour is one primary-key lookup; `local_event_id ± 1` cannot overflow, since
    /// validation caps ids at `MAX_LOCAL_EVENT_ID` and they are ≥ 1.
    pub(super) fn run_edges(
        c: &mut Conn,
        key: (&str, &str, &str),
        step: i64,
        after: i64,
        limit: i64,
    ) -> QueryResult<Vec<i64>> {
        use idempotency_ledger::dsl as l;
        let (terminal, branch, pos) = key;
        l::idempotency_ledger
            .filter(l::terminal_id.eq(terminal))
            .filter(l::branch_id.eq(branch))
            .filter(l::pos_id.eq(pos))
            .filter(l::local_event_id.gt(after))
            .filter(diesel::dsl::not(diesel::dsl::exists(
                NEIGHBOUR_KEYS
                    .filter(NEIGHBOUR_KEYS.field(l::terminal_id).eq(l::terminal_id))
                    .filter(NEIGHBOUR_KEYS.field(l::pos_id).eq(l::pos_id))
                    .filter(NEIGHBOUR_KEYS.field(l::branch_id).eq(l::branch_id))
                    .filter(NEIGHBOUR_KEYS.field(l::local_event_id).eq(l::local_event_id + step)),
            )))
            .order(l::local_event_id.asc())
            .select(l::local_event_id)
            .limit(limit)
            .load(c)
    }

    /// The missing ids below the highest stored one of `(terminal, branch, pos_id)`, as
    /// inclusive ranges, lowest first, at most `limit`: without loading every stored id.
    ///
    /// Stored ids form runs r1 < r2 < … < rm. The gaps are: before r1 when it does not start at
    /// 1, then between the end of r(k) and the start of r(k+1). `run_edges(+1)` lists the ends
    /// of r1, r2, … and `run_edges(-1)` above the lowest id the starts of r2, r3, …, in order,
    /// so the k-th of each bound the k-th inner gap.
    pub(super) fn gaps(
        c: &mut Conn,
        key: (&str, &str, &str),
        limit: usize,
    ) -> QueryResult<Vec<(i64, i64)>> {
        let Some(&lowest) = ids_above(c, key, i64::MIN, 1)?.first() else {
            return Ok(Vec::new());
        };
        let fetch = i64::try_from(limit).unwrap_or(i64::MAX);
        let ends = run_edges(c, key, 1, 0, fetch)?;
        let starts = run_edges(c, key, -1, lowest, fetch)?;
        let leading = (lowest > 1).then(|| (1, lowest - 1));
        Ok(leading
            .into_iter()
            .chain(ends.iter().zip(&starts).map(|(e, s)| (e.saturating_add(1), s.saturating_sub(1))))
            .take(limit)
            .collect())
    }

    /// Keys of one `pos_id` above `after`, any terminal, ascending by local id.
    pub(super) fn held_of_pos(
        c: &mut Conn,
        pos: &str,
        after: i64,
        limit: i64,
    ) -> QueryResult<Vec<(String, i64, String, String)>> {
        use idempotency_ledger::dsl as l;
        l::idempotency_ledger
            .filter(l::pos_id.eq(pos))
            .filter(l::local_event_id.gt(after))
            .order((l::local_event_id.asc(), l::terminal_id.asc()))
            .limit(limit)
            .select((l::terminal_id, l::local_event_id, l::payload_hash, l::cloud_event_id))
            .load(c)
    }

    pub(super) fn count(c: &mut Conn, branch: Option<&str>) -> QueryResult<i64> {
        let mut q = sales_events::table.into_boxed();
        if let Some(b) = branch {
            q = q.filter(sales_events::branch_id.eq(b));
        }
        q.count().get_result(c)
    }
}

/// How each backend claims keys. PostgreSQL: multi-row `INSERT … ON CONFLICT DO NOTHING
/// RETURNING key`, one round trip per chunk. SQLite: Diesel runs SQLite batch inserts with
/// RETURNING row by row and treats a skipped row as an error, so rows are inserted one at a
/// time and the affected-row count (0 or 1) says whether the key was claimed — cheap, since
/// SQLite is in-process and the immediate transaction already excludes other writers.
trait ClaimKeys {
    fn claim(&mut self, rows: &[LedgerRow]) -> QueryResult<Vec<Key>>;
}

impl ClaimKeys for diesel::PgConnection {
    fn claim(&mut self, rows: &[LedgerRow]) -> QueryResult<Vec<Key>> {
        use idempotency_ledger::dsl as l;
        let mut claimed = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(INSERT_CHUNK) {
            let keys: Vec<Key> = diesel::insert_into(l::idempotency_ledger)
                .values(chunk)
                .on_conflict_do_nothing()
                .returning((l::terminal_id, l::pos_id, l::local_event_id))
                .get_results(self)?;
            claimed.extend(keys);
        }
        Ok(claimed)
    }
}

impl ClaimKeys for diesel::SqliteConnection {
    fn claim(&mut self, rows: &[LedgerRow]) -> QueryResult<Vec<Key>> {
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let n = diesel::insert_into(idempotency_ledger::table)
                .values(row)
                .on_conflict_do_nothing()
                .execute(self)?;
            if n == 1 {
                claimed.push((
                    row.terminal_id.clone(),
                    row.pos_id.clone(),
                    row.local_event_id,
                ));
            }
        }
        Ok(claimed)
    }
}

fn key_of(e: &SaleEvent) -> Key {
    (
        e.terminal_id.to_string(),
        e.pos_id.to_string(),
        e.local_event_id,
    )
}

fn parse_id(s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s)
        .map_err(|e| StoreError::Unavailable(format!("corrupt id {s:?} in database: {e}")))
}

/// The `Timestamp` both backends store for `t`, so they hold the same instant: truncated to
/// the microsecond (both columns hold microseconds, and PostgreSQL would round times before
/// 2000 towards 2000), and a leap second (`23:59:60.x`, which RFC 3339 allows) written as the
/// next second's `00.x`, as PostgreSQL itself reads one (SQLite would keep `:60`).
/// This is also the instant the hash chain covers (`journal_chain::canonical_instant`), so a
/// stored sale's canonical bytes can be rebuilt from its row.
fn stored_instant(t: chrono::DateTime<chrono::Utc>) -> NaiveDateTime {
    possync_protocol::journal_chain::canonical_instant(t).naive_utc()
}

fn sales_row(
    req: &IngestRequest,
    cloud_event_id: &str,
    now: NaiveDateTime,
) -> Result<SalesRow, StoreError> {
    let e = &req.event;
    let payload = serde_json::to_value(&e.payload)
        .map_err(|err| StoreError::InvalidInput(format!("payload is not serialisable: {err}")))?;
    Ok(SalesRow {
        cloud_event_id: cloud_event_id.to_string(),
        terminal_id: e.terminal_id.to_string(),
        pos_id: e.pos_id.to_string(),
        local_event_id: e.local_event_id,
        branch_id: e.branch_id.clone(),
        event_type: e.event_type.as_str().to_string(),
        occurred_at: stored_instant(e.occurred_at),
        received_at: now,
        payload: possync_protocol::canonical_json(&payload),
        payload_hash: req.payload_hash.clone(),
        receipt_no: e.payload.receipt_no.clone(),
        total_minor: e.payload.totals.total_minor,
        currency: e.payload.currency.clone(),
        chain_hash: e.chain_hash.clone(),
    })
}

fn stored_end(r: EndRow) -> Result<StoredEnd, StoreError> {
    let event_type =
        r.4.parse()
            .map_err(|e| StoreError::Unavailable(format!("corrupt row in database: {e}")))?;
    Ok(StoredEnd {
        cloud_event_id: r.0,
        branch_id: r.1,
        pos_id: parse_id(&r.2)?,
        local_event_id: r.3,
        event_type,
        occurred_at: r.5,
        payload: r.6,
        chain_hash: r.7,
    })
}

/// The chain links that the sales stored now complete, verified against what is stored.
fn verify_links_of(
    stored: &[SalesRow],
    ends: Vec<EndRow>,
    linked: Vec<String>,
) -> Result<Vec<LinkVerdict>, StoreError> {
    let now_ids: HashSet<String> = stored.iter().map(|r| r.cloud_event_id.clone()).collect();
    let ends = ends
        .into_iter()
        .map(stored_end)
        .collect::<Result<Vec<_>, _>>()?;
    let linked: HashSet<String> = linked.into_iter().collect();
    Ok(links_to_verify(&now_ids, &ends, &linked))
}

/// `(pos_id, n - 1)`, `(pos_id, n)` and `(pos_id, n + 1)` of every stored sale.
fn neighbour_keys(stored: &[SalesRow]) -> Vec<(String, i64)> {
    let mut keys: Vec<(String, i64)> = stored
        .iter()
        .flat_map(|r| [-1, 0, 1].map(|d| (r.pos_id.clone(), r.local_event_id.saturating_add(d))))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

fn link_rows(verdicts: &[LinkVerdict], now: NaiveDateTime) -> Vec<LinkRow> {
    verdicts
        .iter()
        .map(|v| LinkRow {
            cloud_event_id: v.cloud_event_id.clone(),
            branch_id: v.branch_id.clone(),
            pos_id: v.pos_id.to_string(),
            local_event_id: v.local_event_id,
            intact: v.intact,
            expected_hash: v.expected_hash.clone(),
            verified_at: now,
        })
        .collect()
}

/// The smallest UUID v7 text of instant `t`: ids are UUID v7 (time first, hex, fixed width),
/// so their text sorts by creation time and `[id_floor(a), id_floor(b))` is a time range the
/// primary key index can scan.
fn id_floor(t: DateTime<Utc>) -> String {
    let ms = u64::try_from(t.timestamp_millis()).unwrap_or(0) & 0xFFFF_FFFF_FFFF;
    format!(
        "{:08x}-{:04x}-0000-0000-000000000000",
        ms >> 16,
        ms & 0xFFFF
    )
}

/// Verifies the links that ingestion left unverified among the events stored in
/// `[from, to)`, at most `limit` of them, and records the verdicts; returns them.
///
/// Ingestion verifies a link in the transaction that stores its later end, against what that
/// transaction sees. Two cloud instances storing the two ends of one link in concurrent
/// transactions each miss the other's row, so neither verifies it. This pass, run by every
/// instance (`server::recheck_chain_links`), finds such events — chained, no link row, stored
/// in the window — and verifies them now that both ends are committed. An event whose
/// predecessor has still not arrived is a gap, not an unverified link: it stays waiting. A
/// link verified meanwhile by another instance keeps its first verdict (`ON CONFLICT DO
/// NOTHING`).
pub fn recheck_links(
    conn: &mut DbConn,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<LinkVerdict>, StoreError> {
    let (lo, hi) = (id_floor(from), id_floor(to));
    let verdicts = write_txn!(conn, |c, m| -> Result<Vec<LinkVerdict>, StoreError> {
        let pending = m::unlinked(c, &lo, &hi, limit)?;
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        let now_ids: HashSet<String> = pending.iter().map(|p| p.0.clone()).collect();
        let mut keys: Vec<(String, i64)> = pending
            .iter()
            .flat_map(|(_, pos, n)| [(pos.clone(), n.saturating_sub(1)), (pos.clone(), *n)])
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let ends = m::chain_ends(c, &keys)?
            .into_iter()
            .map(stored_end)
            .collect::<Result<Vec<_>, _>>()?;
        // `unlinked` returned only events without a link row; a neighbour that has one may
        // come back as a candidate (the successor of a pending event) and is dropped here.
        let verdicts: Vec<LinkVerdict> = links_to_verify(&now_ids, &ends, &HashSet::new())
            .into_iter()
            .filter(|v| now_ids.contains(&v.cloud_event_id))
            .collect();
        m::store_links(c, &link_rows(&verdicts, now_utc()))?;
        Ok(verdicts)
    })?;
    for v in verdicts.iter().filter(|v| !v.intact) {
        tracing::warn!(branchId = %v.branch_id, posId = %v.pos_id, eventId = v.local_event_id,
            cloudEventId = %v.cloud_event_id, expected = %v.expected_hash,
            errorCode = possync_protocol::ErrorCode::PosSyncChainBreak.as_str(),
            "chain break found by the re-check: the sale is stored, but its chain_hash does not follow from its predecessor");
    }
    Ok(verdicts)
}

/// Ingests a batch of validated events in one transaction and returns one outcome per event,
/// in batch order (see the module docs for why each key takes effect exactly once). A key
/// repeated inside the batch resolves against its first occurrence: same payload hash →
/// `Duplicate`, different → `Conflict`, both with the first occurrence's id.
pub fn ingest_batch(
    conn: &mut DbConn,
    batch: &[IngestRequest],
) -> Result<Vec<IngestOutcome>, StoreError> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let now = now_utc();
    let keys: Vec<Key> = batch.iter().map(|r| key_of(&r.event)).collect();
    // First occurrence of each key, with the id it gets if it is new.
    let mut first: HashMap<&Key, (usize, String)> = HashMap::with_capacity(batch.len());
    let mut ledger_rows = Vec::with_capacity(batch.len());
    for (i, (key, req)) in keys.iter().zip(batch).enumerate() {
        if first.contains_key(key) {
            continue;
        }
        let id = Uuid::now_v7().to_string();
        ledger_rows.push(LedgerRow {
            terminal_id: key.0.clone(),
            pos_id: key.1.clone(),
            local_event_id: key.2,
            payload_hash: req.payload_hash.clone(),
            cloud_event_id: id.clone(),
            branch_id: req.event.branch_id.clone(),
            first_seen_at: now,
        });
        first.insert(key, (i, id));
    }

    // Claim keys in one global order: two transactions claiming overlapping keys then wait
    // on each other in the same order and cannot deadlock (PostgreSQL would abort one).
    ledger_rows.sort_unstable_by(|a, b| {
        (&a.terminal_id, &a.pos_id, a.local_event_id).cmp(&(
            &b.terminal_id,
            &b.pos_id,
            b.local_event_id,
        ))
    });

    let (claimed, earlier, verdicts) = write_txn!(conn, |c, m| -> Result<Claimed, StoreError> {
        let claimed: HashSet<Key> = m::claim(c, &ledger_rows)?.into_iter().collect();
        let mut sales = Vec::with_capacity(claimed.len());
        let mut flags = Vec::new();
        let mut others = Vec::new();
        for row in &ledger_rows {
            let key = (
                row.terminal_id.clone(),
                row.pos_id.clone(),
                row.local_event_id,
            );
            if claimed.contains(&key) {
                let (i, id) = &first[&key];
                sales.push(sales_row(&batch[*i], id, now)?);
                flags.extend(batch[*i].flags.iter().map(|f| FlagRow {
                    cloud_event_id: id.clone(),
                    flag: f.as_str(),
                }));
            } else {
                others.push(key);
            }
        }
        m::store_sales(c, &sales)?;
        m::store_flags(c, &flags)?;
        let ends = m::chain_ends(c, &neighbour_keys(&sales))?;
        let waiting: Vec<String> = ends
            .iter()
            .filter(|e| e.7.is_some())
            .map(|e| e.0.clone())
            .collect();
        let linked = m::linked(c, &waiting)?;
        let verdicts = verify_links_of(&sales, ends, linked)?;
        m::store_links(c, &link_rows(&verdicts, now))?;
        let earlier = if others.is_empty() {
            HashMap::new()
        } else {
            m::first_deliveries(c, &others)?
                .into_iter()
                .map(|(k, h, id)| (k, (h, id)))
                .collect()
        };
        Ok((claimed, earlier, verdicts))
    })?;
    for v in verdicts.iter().filter(|v| !v.intact) {
        tracing::warn!(branchId = %v.branch_id, posId = %v.pos_id, eventId = v.local_event_id,
            cloudEventId = %v.cloud_event_id, expected = %v.expected_hash,
            errorCode = possync_protocol::ErrorCode::PosSyncChainBreak.as_str(),
            "chain break: the sale is stored, but its chain_hash does not follow from its predecessor");
    }
    let broken: HashSet<&str> = verdicts
        .iter()
        .filter(|v| !v.intact)
        .map(|v| v.cloud_event_id.as_str())
        .collect();

    let mut out = Vec::with_capacity(batch.len());
    for (i, (key, req)) in keys.iter().zip(batch).enumerate() {
        let (first_i, new_id) = &first[key];
        // The stored first delivery of this key: this batch's first occurrence if it claimed
        // the key, else the ledger row written by an earlier batch.
        let (stored_hash, stored_id) = if claimed.contains(key) {
            (batch[*first_i].payload_hash.as_str(), new_id.as_str())
        } else {
            let (h, id) = earlier.get(key).ok_or_else(|| {
                StoreError::Unavailable(format!(
                    "key {key:?} was neither claimed nor found in the ledger"
                ))
            })?;
            (h.as_str(), id.as_str())
        };
        let cloud_event_id = parse_id(stored_id)?;
        out.push(if i == *first_i && claimed.contains(key) {
            IngestOutcome::Accepted {
                cloud_event_id,
                chain_break: broken.contains(stored_id),
            }
        } else if req.payload_hash == stored_hash {
            IngestOutcome::Duplicate { cloud_event_id }
        } else {
            IngestOutcome::Conflict { cloud_event_id }
        });
    }
    Ok(out)
}

/// `(pos_id, total_events, highest_contiguous, ids_above_gap)` of one `pos_id`.
type PosRow = (String, i64, i64, Vec<i64>);

/// Per `pos_id` of a terminal, how far ingestion got: the highest `n` with every id in `1..=n`
/// stored, the stored ids above the first gap (at most [`MAX_IDS_ABOVE_GAP`]), and the count.
/// A terminal compares this with its outbox to find events the cloud never received.
pub fn sync_status(
    conn: &mut DbConn,
    terminal_id: Uuid,
    branch_id: &str,
) -> Result<SyncStatus, StoreError> {
    let terminal = terminal_id.to_string();
    let per_pos = read_txn!(conn, |c, m| -> Result<Vec<PosRow>, StoreError> {
        let mut out = Vec::new();
        for (pos, count, max) in m::pos_summary(c, &terminal, branch_id)? {
            // Ids are unique and >= 1, so count == max means 1..=max are all present. Else
            // the first gap and the ids above it come from the database, bounded: the first
            // gap is found by one primary-key probe per stored id below it (LIMITed at the
            // first miss) and at most 1000 ids above it are read — never the till's whole
            // history into memory.
            if max == Some(count) {
                out.push((pos, count, count, Vec::new()));
                continue;
            }
            let key = (terminal.as_str(), branch_id, pos.as_str());
            let contiguous = m::gaps(c, key, 1)?
                .first()
                .map_or(count, |(first_missing, _)| first_missing.saturating_sub(1));
            let limit = i64::try_from(MAX_IDS_ABOVE_GAP).unwrap_or(i64::MAX);
            let above = m::ids_above(c, key, contiguous, limit)?;
            out.push((pos, count, contiguous, above));
        }
        Ok(out)
    })?;
    let mut pos = Vec::with_capacity(per_pos.len());
    for (pos_id, total_events, highest_contiguous, ids_above_gap) in per_pos {
        pos.push(PosIngestion {
            pos_id: parse_id(&pos_id)?,
            highest_contiguous,
            ids_above_gap,
            total_events,
        });
    }
    Ok(SyncStatus {
        terminal_id,
        branch_id: branch_id.to_string(),
        pos,
    })
}

/// The keys held for one `pos_id` (under any terminal) with `local_event_id > after`, at most
/// `limit` (capped at [`possync_protocol::MAX_HELD_KEYS_PER_PAGE`]), through the
/// `(pos_id, local_event_id)` index.
///
/// Any terminal may ask about any `pos_id`: a `pos_id` is a random UUID that only the database
/// which created it knows, and the answer holds ids and hashes, never a receipt. This is what
/// lets a till re-enrolled under a new terminal (or branch) learn which of its unsent sales
/// reached the cloud under the old identity.
pub fn held_keys(
    conn: &mut DbConn,
    pos_id: Uuid,
    after: i64,
    limit: usize,
) -> Result<HeldKeysPage, StoreError> {
    let limit = limit.clamp(1, possync_protocol::MAX_HELD_KEYS_PER_PAGE);
    let pos = pos_id.to_string();
    // One page more than asked tells whether another page follows.
    let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
    let mut rows = with_conn!(conn, |c, m| m::held_of_pos(c, &pos, after, fetch))?;
    let more = rows.len() > limit;
    if more {
        // The cursor is a local id, so a page must not end inside the group of keys sharing
        // one (a pos_id once used by two terminals): the rest of that group would be skipped.
        let next = rows[limit].1;
        rows.truncate(limit);
        let whole = rows.iter().filter(|r| r.1 != next).count();
        if whole > 0 {
            rows.truncate(whole);
        }
    }
    let keys = rows
        .into_iter()
        .map(|(t, local_event_id, payload_hash, id)| {
            Ok(HeldKey {
                terminal_id: parse_id(&t)?,
                local_event_id,
                payload_hash,
                cloud_event_id: parse_id(&id)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let next_after = if more {
        keys.last().map(|k| k.local_event_id)
    } else {
        None
    };
    Ok(HeldKeysPage {
        pos_id,
        keys,
        next_after,
    })
}

/// The missing ids below the highest stored one of `(terminal, branch, pos_id)`, as inclusive
/// ranges, lowest first, at most `limit`, read without loading every stored id.
pub(crate) fn missing_ranges(
    conn: &mut DbConn,
    terminal: &str,
    branch: &str,
    pos: &str,
    limit: usize,
) -> Result<Vec<(i64, i64)>, StoreError> {
    Ok(with_conn!(conn, |c, m| m::gaps(
        c,
        (terminal, branch, pos),
        limit
    ))?)
}

/// The flags stored with a sale (spelled as [`SaleFlag::as_str`]), in name order.
pub fn flags_of(conn: &mut DbConn, cloud_event_id: Uuid) -> Result<Vec<String>, StoreError> {
    let id = cloud_event_id.to_string();
    Ok(with_conn!(conn, |c, m| m::flags_of(c, &id))?)
}

/// Number of stored sales events, of one branch or of all.
pub fn count_sales(conn: &mut DbConn, branch_id: Option<&str>) -> Result<i64, StoreError> {
    Ok(with_conn!(conn, |c, m| m::count(c, branch_id))?)
}

#[cfg(test)]
#[path = "ledger_tests.rs"]
mod tests;
