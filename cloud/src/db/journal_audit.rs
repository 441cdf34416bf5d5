//! Reading the sales journal back for audit: `cloud audit export` (one
//! [`AuditRecord`] per stored sale of a branch, by `pos_id` and `local_event_id`) and the chain
//! and gap figures of the fleet view and the metrics.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use diesel::prelude::*;
use possync_protocol::journal_chain::{prev_of, AuditRecord};
use possync_protocol::EventType;
use uuid::Uuid;

use super::schema::{idempotency_ledger, sales_chain_links, sales_events};
use super::{for_each_backend, read_txn, with_conn, DbConn, StoreError};

/// Rows per export page.
const EXPORT_PAGE: i64 = 1000;

/// `(cloud_event_id, terminal_id, pos_id, local_event_id, event_type, occurred_at,
/// received_at, payload, chain_hash, branch_id)`.
type ExportRow = (
    String,
    String,
    String,
    i64,
    String,
    NaiveDateTime,
    NaiveDateTime,
    String,
    Option<String>,
    String,
);

/// `(pos_id, lowest id, highest id)`.
type PosRange = (String, Option<i64>, Option<i64>);

/// `(branch_id, terminal_id, pos_id, stored ids, highest id)`.
type PosExtent = (String, String, String, i64, Option<i64>);

for_each_backend! {
    /// Per `pos_id` of `branch`: the lowest and highest `local_event_id` of the sales that
    /// happened in `[from, last]`.
    pub(super) fn ranges(
        c: &mut Conn,
        branch: &str,
        from: NaiveDateTime,
        last: NaiveDateTime,
    ) -> QueryResult<Vec<PosRange>> {
        use sales_events::dsl as s;
        s::sales_events
            .filter(s::branch_id.eq(branch))
            .filter(s::occurred_at.ge(from))
            .filter(s::occurred_at.le(last))
            .group_by(s::pos_id)
            .select((s::pos_id, diesel::dsl::min(s::local_event_id), diesel::dsl::max(s::local_event_id)))
            .order(s::pos_id.asc())
            .load(c)
    }

    /// One page of `branch`'s stored sales of a `pos_id`, in the export order
    /// `(local_event_id, terminal_id)` — unique within a `pos_id`, since the ledger key is
    /// `(terminal_id, pos_id, local_event_id)` — strictly after the keyset cursor `after`,
    /// with ids up to `last`. The cursor is the full order key, so a page boundary inside the
    /// rows sharing one id (a `pos_id` delivered under two terminals) skips nothing.
    pub(super) fn page(
        c: &mut Conn,
        branch: &str,
        pos: &str,
        after: (i64, &str),
        last: i64,
        limit: i64,
    ) -> QueryResult<Vec<ExportRow>> {
        use sales_events::dsl as s;
        let (after_id, after_terminal) = after;
        s::sales_events
            .filter(s::branch_id.eq(branch))
            .filter(s::pos_id.eq(pos))
            .filter(
                s::local_event_id
                    .gt(after_id)
                    .or(s::local_event_id.eq(after_id).and(s::terminal_id.gt(after_terminal))),
            )
            .filter(s::local_event_id.le(last))
            .order((s::local_event_id.asc(), s::terminal_id.asc()))
            .limit(limit)
            .select((s::cloud_event_id, s::terminal_id, s::pos_id, s::local_event_id, s::event_type,
                     s::occurred_at, s::received_at, s::payload, s::chain_hash, s::branch_id))
            .load(c)
    }

    /// Chain hashes stored for `(pos, id)` (one per terminal that delivered it).
    pub(super) fn hashes_at(c: &mut Conn, pos: &str, id: i64) -> QueryResult<Vec<Option<String>>> {
        use sales_events::dsl as s;
        s::sales_events
            .filter(s::pos_id.eq(pos))
            .filter(s::local_event_id.eq(id))
            .select(s::chain_hash)
            .load(c)
    }

    /// Recorded chain breaks per branch.
    pub(super) fn breaks_per_branch(c: &mut Conn) -> QueryResult<Vec<(String, i64)>> {
        use sales_chain_links::dsl as l;
        l::sales_chain_links
            .filter(l::intact.eq(false))
            .group_by(l::branch_id)
            .select((l::branch_id, diesel::dsl::count_star()))
            .load(c)
    }

    /// Recorded chain breaks of one branch: `(terminal_id, pos_id, local_event_id)`.
    pub(super) fn breaks_of(c: &mut Conn, branch: &str) -> QueryResult<Vec<(String, String, i64)>> {
        use sales_chain_links::dsl as l;
        use sales_events::dsl as s;
        l::sales_chain_links
            .inner_join(s::sales_events.on(s::cloud_event_id.eq(l::cloud_event_id)))
            .filter(l::intact.eq(false))
            .filter(l::branch_id.eq(branch))
            .order((l::pos_id.asc(), l::local_event_id.asc()))
            .select((s::terminal_id, l::pos_id, l::local_event_id))
            .load(c)
    }

    /// Per `(branch, terminal, pos_id)`: count of stored ids and the highest.
    pub(super) fn pos_extent(c: &mut Conn) -> QueryResult<Vec<PosExtent>> {
        use idempotency_ledger::dsl as l;
        l::idempotency_ledger
            .group_by((l::branch_id, l::terminal_id, l::pos_id))
            .select((l::branch_id, l::terminal_id, l::pos_id, diesel::dsl::count_star(), diesel::dsl::max(l::local_event_id)))
            .load(c)
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("corrupt {what} in database: {e}"))
}

fn record(r: ExportRow) -> Result<AuditRecord, StoreError> {
    let event_type: EventType = r.4.parse().map_err(|e| corrupt("event type", e))?;
    Ok(AuditRecord {
        pos_id: Uuid::parse_str(&r.2).map_err(|e| corrupt("pos_id", e))?,
        local_event_id: r.3,
        terminal_id: Some(Uuid::parse_str(&r.1).map_err(|e| corrupt("terminal_id", e))?),
        branch_id: Some(r.9),
        event_type,
        occurred_at: r.5.and_utc(),
        payload: serde_json::from_str(&r.7).map_err(|e| corrupt("payload", e))?,
        chain_hash: r.8,
        prev_chain_hash: None,
        cloud_event_id: Some(Uuid::parse_str(&r.0).map_err(|e| corrupt("cloud_event_id", e))?),
        received_at: Some(r.6.and_utc()),
    })
}

/// Writes `branch`'s journal, every `pos_id` from the first to the last sale that happened in
/// `[from, to)` (holes included, so a gap in the file is a gap in the cloud), one record per
/// stored sale, by `pos_id` then `local_event_id`, through `emit`. The first record of each
/// `pos_id` carries `prev_chain_hash`: the genesis for id 1, else what the cloud holds for the
/// predecessor (`None` when it holds none: the file then shows the gap). Returns the count.
pub fn export_journal(
    conn: &mut DbConn,
    branch: &str,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    emit: &mut dyn FnMut(&AuditRecord) -> std::io::Result<()>,
) -> Result<u64, StoreError> {
    export_journal_paged(conn, branch, from, to, EXPORT_PAGE, emit)
}

/// [`export_journal`] reading `page_rows` rows per query (tests use small pages).
pub(crate) fn export_journal_paged(
    conn: &mut DbConn,
    branch: &str,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    page_rows: i64,
    emit: &mut dyn FnMut(&AuditRecord) -> std::io::Result<()>,
) -> Result<u64, StoreError> {
    let page_rows = page_rows.max(1);
    // Stored instants are microseconds in years 1..=9999 (see `validate_event`).
    let earliest = chrono::NaiveDate::from_ymd_opt(1, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .ok_or_else(|| corrupt("bound", "year 1"))?;
    let latest = chrono::NaiveDate::from_ymd_opt(9999, 12, 31)
        .and_then(|d| d.and_hms_micro_opt(23, 59, 59, 999_999))
        .ok_or_else(|| corrupt("bound", "year 9999"))?;
    let from = from.map_or(earliest, |t| t.naive_utc());
    let last = to.map_or(latest, |t| {
        (t - chrono::Duration::microseconds(1)).naive_utc()
    });
    let ranges = with_conn!(conn, |c, m| m::ranges(c, branch, from, last))?;
    let mut n = 0u64;
    for (pos, first, last) in ranges {
        let (Some(first), Some(last)) = (first, last) else {
            continue;
        };
        let pos_id = Uuid::parse_str(&pos).map_err(|e| corrupt("pos_id", e))?;
        let prev = if first == 1 {
            Some(prev_of(pos_id, 1, None))
        } else {
            let before = with_conn!(conn, |c, m| m::hashes_at(c, &pos, first.saturating_sub(1)))?;
            before.first().map(|h| prev_of(pos_id, first, h.as_deref()))
        };
        // Keyset cursor `(local_event_id, terminal_id)`: every terminal id sorts after "".
        let mut after = (first.saturating_sub(1), String::new());
        let mut first_of_pos = true;
        loop {
            let rows = read_txn!(conn, |c, m| -> Result<Vec<ExportRow>, StoreError> {
                Ok(m::page(
                    c,
                    branch,
                    &pos,
                    (after.0, &after.1),
                    last,
                    page_rows,
                )?)
            })?;
            let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= page_rows;
            let Some(end) = rows.last().map(|r| (r.3, r.1.clone())) else {
                break;
            };
            for row in rows {
                let mut rec = record(row)?;
                if first_of_pos {
                    rec.prev_chain_hash = prev.clone();
                    first_of_pos = false;
                }
                emit(&rec).map_err(|e| StoreError::Unavailable(format!("writing: {e}")))?;
                n += 1;
            }
            // The cursor strictly increases (the order key is unique), so this ends.
            if !full {
                break;
            }
            after = end;
        }
    }
    Ok(n)
}

/// Recorded chain breaks per branch.
pub fn chain_breaks_per_branch(conn: &mut DbConn) -> Result<BTreeMap<String, i64>, StoreError> {
    Ok(with_conn!(conn, |c, m| m::breaks_per_branch(c))?
        .into_iter()
        .collect())
}

/// Recorded chain breaks of one branch: `(terminal_id, pos_id, local_event_id)`.
pub fn chain_breaks_of(
    conn: &mut DbConn,
    branch: &str,
) -> Result<Vec<(String, String, i64)>, StoreError> {
    Ok(with_conn!(conn, |c, m| m::breaks_of(c, branch))?)
}

/// Ids missing below the highest stored id of one `(terminal, pos_id)`, as inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PendingGaps {
    /// The branch.
    pub branch_id: String,
    /// The terminal.
    pub terminal_id: String,
    /// The local database.
    pub pos_id: String,
    /// Missing `local_event_id`s, as `[first, last]` ranges, lowest first.
    pub missing: Vec<(i64, i64)>,
    /// How many ids are missing in all.
    pub missing_events: i64,
}

/// Most gap ranges listed per `pos_id` (the count stays exact).
pub const MAX_GAP_RANGES: usize = 100;

/// Every `(terminal, pos_id)` with ids missing below its highest stored id.
pub fn pending_gaps(conn: &mut DbConn) -> Result<Vec<PendingGaps>, StoreError> {
    let extents = with_conn!(conn, |c, m| m::pos_extent(c))?;
    let mut out = Vec::new();
    for (branch_id, terminal_id, pos_id, count, max) in extents {
        let Some(max) = max else { continue };
        if count >= max {
            continue;
        }
        // The first MAX_GAP_RANGES ranges come from the database: a till with millions of
        // stored ids and a few holes is not loaded id by id on every fleet-page request.
        let missing =
            super::ledger::missing_ranges(conn, &terminal_id, &branch_id, &pos_id, MAX_GAP_RANGES)?;
        out.push(PendingGaps {
            branch_id,
            terminal_id,
            pos_id,
            missing,
            missing_events: max.saturating_sub(count),
        });
    }
    Ok(out)
}

/// What the fleet view and the metrics show of the sales journal: pending gaps per till and
/// recorded chain breaks, per branch.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct JournalSignals {
    /// Tills with sales missing below their highest stored id.
    pub gaps: Vec<PendingGaps>,
    /// Recorded chain breaks: `(branch_id, terminal_id, pos_id, local_event_id)`.
    pub chain_breaks: Vec<ChainBreak>,
}

/// One recorded chain break.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChainBreak {
    /// The branch.
    pub branch_id: String,
    /// The terminal that delivered the event.
    pub terminal_id: String,
    /// The event's `pos_id`.
    pub pos_id: String,
    /// The event whose link broke.
    pub local_event_id: i64,
}

impl JournalSignals {
    /// Missing sales per branch.
    pub fn gaps_per_branch(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for g in &self.gaps {
            let n = out.entry(g.branch_id.clone()).or_insert(0i64);
            *n = n.saturating_add(g.missing_events);
        }
        out
    }

    /// Chain breaks per branch.
    pub fn breaks_per_branch(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for b in &self.chain_breaks {
            *out.entry(b.branch_id.clone()).or_insert(0) += 1;
        }
        out
    }
}

/// Missing sales per branch (branches with gaps only), for the `sales_gaps` gauge: one grouped
/// query, without the per-till id lists [`pending_gaps`] reads for the fleet view.
pub fn gaps_per_branch(conn: &mut DbConn) -> Result<BTreeMap<String, i64>, StoreError> {
    let mut out = BTreeMap::new();
    for (branch, _, _, count, max) in with_conn!(conn, |c, m| m::pos_extent(c))? {
        if let Some(max) = max.filter(|m| *m > count) {
            let n = out.entry(branch).or_insert(0i64);
            *n = n.saturating_add(max - count);
        }
    }
    Ok(out)
}

/// Reads the journal signals of every branch.
pub fn journal_signals(conn: &mut DbConn) -> Result<JournalSignals, StoreError> {
    let gaps = pending_gaps(conn)?;
    let mut chain_breaks = Vec::new();
    for branch in chain_breaks_per_branch(conn)?.into_keys() {
        for (terminal_id, pos_id, local_event_id) in chain_breaks_of(conn, &branch)? {
            chain_breaks.push(ChainBreak {
                branch_id: branch.clone(),
                terminal_id,
                pos_id,
                local_event_id,
            });
        }
    }
    Ok(JournalSignals { gaps, chain_breaks })
}
