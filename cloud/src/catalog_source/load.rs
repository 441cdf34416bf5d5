//! The initial load: what the mapped tables hold when the capture is installed, copied into
//! the catalog in keyset-ordered batches through the same staging and flush the triggers use
//! (so the version rule, the no-op rule for unchanged documents, tombstones and branch scope
//! are the very same code).
//!
//! # Why a batch cannot overwrite a newer change
//!
//! Each batch transaction first takes the counter's row lock, and only then reads its rows
//! (READ COMMITTED: every statement sees what committed before it started). A back-office
//! transaction that committed before the lock was granted already flushed, so the batch reads
//! its rows in their new state; one that commits later flushes after the batch, with higher
//! versions, so its state wins. The triggers are installed before the load starts, so no
//! change falls between the two.
//!
//! # Resumable
//!
//! Every batch commits on its own. Re-running the load after an interruption re-stages rows
//! whose documents are already stored, and the flush turns those into no-ops (no new
//! version, nothing for terminals to download); rows the catalog holds but the table does not
//! are tombstoned by the last step.

use diesel::connection::SimpleConnection;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::sql_types::{Array, Text};
use diesel::PgConnection;

use super::capture::{id_sql, lit, q, stage_sql, table_sql, Staged, BAD_KEY_SQL};
use super::inspect::{CheckedEntity, CheckedSource};
use super::SourceError;

/// Rows per batch transaction.
pub const LOAD_BATCH: i64 = 1000;

/// What a load did per type.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LoadReport {
    /// Entity type.
    #[serde(rename = "type")]
    pub entity_type: String,
    /// Rows read from the table.
    pub rows: i64,
    /// Batch transactions committed.
    pub batches: i64,
}

#[derive(QueryableByName)]
struct Key {
    #[diesel(sql_type = Array<Text>)]
    key: Vec<String>,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Loads every mapped table; the capture must be installed.
pub fn load(
    conn: &mut PgConnection,
    source: &CheckedSource,
) -> Result<Vec<LoadReport>, SourceError> {
    super::capture::verify_installed(conn, source)?;
    let s = q(&source.possync_schema);
    let mut out = Vec::new();
    for e in &source.entities {
        out.push(load_entity(conn, &s, e)?);
    }
    // Fresh statistics, as `cloud catalog import` does, so pages over a just-loaded catalog
    // are planned as index scans.
    conn.batch_execute(&format!("ANALYZE {s}.catalog_entities"))?;
    Ok(out)
}

fn lock_counter(c: &mut PgConnection, s: &str) -> Result<(), SourceError> {
    c.batch_execute(&format!(
        "UPDATE {s}.catalog_counter SET version = version WHERE id = 1"
    ))?;
    Ok(())
}

fn mark_pending(c: &mut PgConnection, s: &str) -> Result<(), SourceError> {
    c.batch_execute(&format!(
        "INSERT INTO {s}.possync_source_pending (txid) VALUES (txid_current()) \
         ON CONFLICT DO NOTHING"
    ))?;
    Ok(())
}

fn load_entity(
    conn: &mut PgConnection,
    s: &str,
    e: &CheckedEntity,
) -> Result<LoadReport, SourceError> {
    let t = table_sql(e);
    let pk_cols: Vec<String> = e.mapping.id.iter().map(|c| format!("r.{}", q(c))).collect();
    let pk_row = format!("({})", pk_cols.join(", "));
    let pk_text = format!(
        "ARRAY[{}]",
        pk_cols
            .iter()
            .map(|c| format!("({c})::text"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // `($1::type, $2::type)`: the previous batch's last key, cast back to the columns' types
    // so the comparison is the primary key's own order.
    let bound = |first: usize| {
        let casts: Vec<String> = e
            .mapping
            .id
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "${}::{}",
                    first + i,
                    e.sql_types.get(c).map_or("text", String::as_str)
                )
            })
            .collect();
        format!("({})", casts.join(", "))
    };
    let n = e.mapping.id.len();
    let mut after: Option<Vec<String>> = None;
    let mut report = LoadReport {
        entity_type: e.mapping.entity_type.clone(),
        rows: 0,
        batches: 0,
    };
    loop {
        let batch = conn.transaction(|c| -> Result<(i64, Option<Vec<String>>), SourceError> {
            lock_counter(c, s)?;
            let lower = match &after {
                Some(_) => format!("WHERE {pk_row} > {}", bound(1)),
                None => String::new(),
            };
            // The last key of this batch, if the table holds a full batch beyond `after`.
            let mut upper_q = diesel::sql_query(format!(
                "SELECT {pk_text} AS key FROM {t} r {lower} ORDER BY {} OFFSET {} LIMIT 1",
                pk_cols.join(", "),
                LOAD_BATCH - 1
            ))
            .into_boxed::<Pg>();
            for v in after.iter().flatten() {
                upper_q = upper_q.bind::<Text, _>(v.clone());
            }
            let upper: Option<Key> = upper_q.get_result(c).optional()?;
            let upper = upper.map(|k| k.key);
            let mut conds = Vec::new();
            if after.is_some() {
                conds.push(format!("{pk_row} > {}", bound(1)));
            }
            if upper.is_some() {
                let first = if after.is_some() { n + 1 } else { 1 };
                conds.push(format!("{pk_row} <= {}", bound(first)));
            }
            let filter = if conds.is_empty() {
                String::new()
            } else {
                format!("WHERE {}", conds.join(" AND "))
            };
            let staged = stage_sql(s, e, &t, Staged::State, &filter);
            let mut stage_q = diesel::sql_query(format!(
                "WITH staged AS ({staged} RETURNING entity_id, branch_id) \
                 SELECT count(*) AS n FROM staged"
            ))
            .into_boxed::<Pg>();
            for v in after.iter().flatten().chain(upper.iter().flatten()) {
                stage_q = stage_q.bind::<Text, _>(v.clone());
            }
            let rows: Count = stage_q.get_result(c)?;
            refuse_bad_staged(c, s, &e.mapping.entity_type)?;
            mark_pending(c, s)?;
            Ok((rows.n, upper))
        })?;
        report.rows += batch.0;
        report.batches += 1;
        tracing::info!(
            entity_type = %e.mapping.entity_type,
            rows = report.rows,
            "catalog source load batch committed"
        );
        match batch.1 {
            Some(last) => after = Some(last),
            None => break,
        }
    }
    // Fresh statistics before planning over what the batches just wrote.
    conn.batch_execute(&format!("ANALYZE {s}.catalog_entities"))?;
    // Keys the catalog holds for this type that the table no longer has (deleted before the
    // capture existed, or written by an import): tombstones, under the lock as well. A set
    // difference (`EXCEPT`) joined to nothing (the flush takes a tombstone's branch from the
    // stored row): a `NOT EXISTS` or a join back to `catalog_entities` was planned, on the
    // statistics of a catalog that had no such rows yet, as a loop over the whole table per
    // entity — minutes at 100 000 rows.
    conn.transaction(|c| -> Result<(), SourceError> {
        lock_counter(c, s)?;
        c.batch_execute(&format!(
            "INSERT INTO {s}.possync_source_changes \
                 (txid, entity_type, entity_id, branch_id, deleted, data, hash) \
             SELECT txid_current(), {ty}, gone.entity_id, NULL, true, 'null', \
                    encode(sha256(convert_to('null', 'UTF8')), 'hex') \
             FROM (SELECT entity_id FROM {s}.catalog_entities \
                   WHERE entity_type = {ty} AND NOT deleted \
                   EXCEPT SELECT ({id}) COLLATE \"C\" FROM {t} r) gone",
            ty = lit(&e.mapping.entity_type),
            id = id_sql(e, "r"),
        ))?;
        mark_pending(c, s)
    })?;
    Ok(report)
}

/// Fails the batch if it staged a key the catalog cannot hold (the triggers' rule).
fn refuse_bad_staged(c: &mut PgConnection, s: &str, entity_type: &str) -> Result<(), SourceError> {
    #[derive(QueryableByName)]
    struct Bad {
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        entity_id: Option<String>,
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        branch_id: Option<String>,
    }
    let bad: Option<Bad> = diesel::sql_query(format!(
        "SELECT entity_id, branch_id FROM {s}.possync_source_changes \
         WHERE txid = txid_current() AND {BAD_KEY_SQL} LIMIT 1"
    ))
    .get_result(c)
    .optional()?;
    match bad {
        None => Ok(()),
        Some(b) => Err(SourceError::BadRow(format!(
            "possync catalog source: {entity_type} row with id {:?} and branch {:?} cannot \
             enter the catalog (ids: 1-128 printable ASCII without spaces; branches: 1-64 of \
             [a-z0-9_-])",
            b.entity_id, b.branch_id
        ))),
    }
}
