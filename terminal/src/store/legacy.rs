//! Migration of the legacy local database — the layout that synced through Google Drive
//! (built for the tests by `terminal/tests/fixtures/legacy.rs`) — into this schema, in place, after a backup.
//!
//! Three steps, each its own transaction, each safe to repeat after a crash:
//! 1. retire: `products` → `legacy_products`, `sales` → `legacy_sales`, every `drive_*`
//!    table → `legacy_drive_*` (kept, never deleted: the backup and these tables are the
//!    audit trail);
//! 2. the numbered migrations create this schema;
//! 3. convert: products → `catalog_entities` (`product/legacy-<id>`, version 0 so any cloud
//!    version wins) + `catalog_id_map` + `local_inventory`; sales not yet on Drive →
//!    `sales` + `sync_journal` (`pending`, or `needs_attention` with the reason when the
//!    sale cannot be expressed as a valid SALE payload); sales already on Drive → `sales` only.
//!    `sync_state.legacy_migrated_at` marks it done.

use chrono::{DateTime, NaiveDateTime, Utc};
use possync_protocol::{
    entity_hash, validate_payload, ErrorCode, EventType, Payment, PaymentMethod, SaleLine,
    SalePayload, Totals,
};
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use uuid::Uuid;

use super::error::TerminalStoreError;
use super::journal::{insert_queued_sale, insert_sale_record, QueuedSale};
use super::schema::table_exists;
use super::{read_enrollment, time_text, Kv, SqliteStore};

/// Currency of legacy amounts: the old layout stored bare cents without a currency.
pub const LEGACY_CURRENCY: &str = "EUR";

/// What `migrate_legacy` found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LegacyOutcome {
    /// The legacy layout was converted now.
    Migrated,
    /// It had been converted before; the counts are those of that run.
    AlreadyMigrated,
    /// The file holds no legacy layout (a new or current database); nothing converted.
    NoLegacyLayout,
}

/// Counts of a legacy conversion, so an operator can check nothing was lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyReport {
    /// What the migration did.
    pub outcome: LegacyOutcome,
    /// The safety copy of the legacy file.
    pub backup_path: Option<PathBuf>,
    /// Rows in the legacy `products` table / converted into `catalog_entities` and mapped.
    pub products: i64,
    /// `local_inventory` rows written from legacy stock.
    pub inventory_rows: i64,
    /// Rows in the legacy `sales` table; every one is in `sales` now.
    pub sales: i64,
    /// Legacy sales that Drive already held: kept in `sales` for history, not queued.
    pub sales_history_only: i64,
    /// Legacy sales not yet on Drive, queued as `pending`.
    pub sales_queued: i64,
    /// Legacy sales not yet on Drive that could not be converted: `needs_attention`.
    pub sales_needing_attention: i64,
    /// Tables renamed `legacy_*`.
    pub retired_tables: Vec<String>,
    /// When the conversion ran.
    pub migrated_at: Option<DateTime<Utc>>,
}

impl LegacyReport {
    fn empty(outcome: LegacyOutcome) -> Self {
        LegacyReport {
            outcome,
            backup_path: None,
            products: 0,
            inventory_rows: 0,
            sales: 0,
            sales_history_only: 0,
            sales_queued: 0,
            sales_needing_attention: 0,
            retired_tables: Vec::new(),
            migrated_at: None,
        }
    }
}

/// Runs the legacy migration on the file at `path` explicitly (`terminal migrate
/// --legacy-db PATH`). Opening the store does the same; this one refuses a missing file
/// instead of creating an empty database, and reports what it found.
pub fn migrate_legacy(path: &Path) -> Result<LegacyReport, TerminalStoreError> {
    if !path.is_file() {
        return Err(TerminalStoreError::NotADatabase(format!(
            "{} is not a file",
            path.display()
        )));
    }
    let (store, report) = SqliteStore::open_with_report(path)?;
    if let Some(legacy) = report.legacy {
        return Ok(legacy);
    }
    let conn = store.conn();
    match Kv::SyncState.get(&conn, "legacy_report")? {
        Some(text) => {
            let mut previous: LegacyReport = serde_json::from_str(&text)?;
            previous.outcome = LegacyOutcome::AlreadyMigrated;
            Ok(previous)
        }
        None => Ok(LegacyReport::empty(LegacyOutcome::NoLegacyLayout)),
    }
}

/// Whether the file still has the legacy layout's original tables (step 1 not done).
pub fn has_original_layout(conn: &Connection) -> Result<bool, TerminalStoreError> {
    Ok(table_exists(conn, "drive_sync_state")?
        && table_exists(conn, "products")?
        && table_exists(conn, "sales")?
        && !table_exists(conn, "schema_migrations")?)
}

/// Step 1: renames the legacy tables out of the way of this schema, in one transaction.
pub fn retire_original_tables(conn: &mut Connection) -> Result<Vec<String>, TerminalStoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if !has_original_layout(&tx)? {
        // another process retired them while we waited for the write lock
        return Ok(Vec::new());
    }
    let drive: Vec<String> = tx
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'drive\\_%' ESCAPE '\\' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut retired = Vec::new();
    // the old app's own schema numbering (if any) means nothing to this schema
    tx.pragma_update(None, "user_version", 0)?;
    for old in ["products", "sales"]
        .into_iter()
        .map(String::from)
        .chain(drive)
    {
        let new = format!("legacy_{old}");
        tx.execute_batch(&format!("ALTER TABLE \"{old}\" RENAME TO \"{new}\""))?;
        retired.push(new);
    }
    tx.commit()?;
    tracing::info!(?retired, "legacy Google Drive tables retired");
    Ok(retired)
}

/// The line shape of the legacy `lines_json`.
#[derive(Debug, Deserialize)]
struct LegacyLine {
    product_id: i64,
    qty: i64,
    price_cents: i64,
    #[serde(default)]
    discount_cents: i64,
}

/// Legacy product facts needed to describe a sale line.
struct ProductFacts {
    sku: Option<String>,
    name: String,
}

/// Parses the legacy `created_at`: SQLite's `YYYY-MM-DD HH:MM:SS` (UTC) or RFC 3339.
fn parse_legacy_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
                .ok()
                .map(|n| n.and_utc())
        })
}

struct ConvertedSale {
    event_type: EventType,
    occurred_at: DateTime<Utc>,
    payload: SalePayload,
    /// Why it cannot be delivered as is, if it cannot.
    problem: Option<String>,
}

/// Converts one legacy sale into a SALE payload. Always produces something storable; when the
/// result is not a valid sale, `problem` says why (the row then needs an operator).
fn convert_sale(
    id: i64,
    receipt_no: &str,
    created_at: &str,
    total_cents: i64,
    lines_json: &str,
    products: &HashMap<i64, ProductFacts>,
    now: DateTime<Utc>,
) -> ConvertedSale {
    let mut problems = Vec::new();
    let occurred_at = parse_legacy_time(created_at).unwrap_or_else(|| {
        problems.push(format!(
            "created_at {created_at:?} is not a time; migration time used"
        ));
        now
    });
    let legacy_lines: Vec<LegacyLine> = match serde_json::from_str(lines_json) {
        Ok(lines) => lines,
        Err(e) => {
            problems.push(format!("lines_json unreadable ({e})"));
            Vec::new()
        }
    };
    let lines: Vec<SaleLine> = legacy_lines
        .iter()
        .map(|l| {
            let facts = products.get(&l.product_id);
            SaleLine {
                product_id: format!("legacy-{}", l.product_id),
                sku: facts.and_then(|f| f.sku.clone()).unwrap_or_default(),
                name: facts.map(|f| f.name.clone()).unwrap_or_default(),
                qty: l.qty,
                unit_price_minor: l.price_cents,
                discount_minor: l.discount_cents,
                tax_minor: 0,
                total_minor: l
                    .qty
                    .saturating_mul(l.price_cents)
                    .saturating_sub(l.discount_cents),
            }
        })
        .collect();
    let event_type = if lines.iter().any(|l| l.qty < 0) {
        EventType::Refund
    } else {
        EventType::Sale
    };
    let receipt_no = if receipt_no.trim().is_empty() {
        format!("LEGACY-{id}")
    } else {
        receipt_no.to_string()
    };
    let payload = SalePayload {
        receipt_no,
        currency: LEGACY_CURRENCY.to_string(),
        lines,
        totals: Totals {
            subtotal_minor: total_cents,
            tax_minor: 0,
            total_minor: total_cents,
        },
        payments: vec![Payment {
            method: PaymentMethod::Other,
            amount_minor: total_cents,
        }],
    };
    if problems.is_empty() {
        if let Err(e) = validate_payload(event_type, &payload) {
            problems.push(e.to_string());
        }
    }
    ConvertedSale {
        event_type,
        occurred_at,
        payload,
        problem: (!problems.is_empty()).then(|| {
            format!(
                "legacy sale #{id} could not be converted: {}",
                problems.join("; ")
            )
        }),
    }
}

/// Step 3: converts the retired legacy tables if that has not happened yet, in one
/// transaction. Returns `None` when there is nothing to convert.
pub fn convert_if_pending(
    conn: &mut Connection,
    pos_id: Uuid,
    backup_path: Option<PathBuf>,
) -> Result<Option<LegacyReport>, TerminalStoreError> {
    if !table_exists(conn, "legacy_products")?
        || !table_exists(conn, "legacy_sales")?
        || Kv::SyncState.get(conn, "legacy_migrated_at")?.is_some()
    {
        return Ok(None);
    }
    let now = Utc::now();
    let now_text = time_text(now);
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if Kv::SyncState.get(&tx, "legacy_migrated_at")?.is_some() {
        // converted by another process while we waited for the write lock
        return Ok(None);
    }
    let mut report = LegacyReport::empty(LegacyOutcome::Migrated);
    report.backup_path = backup_path;
    report.retired_tables = tx
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'legacy\\_%' ESCAPE '\\' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;

    // products → catalog_entities + catalog_id_map + local_inventory
    type ProductRow = (
        i64,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<i64>,
    );
    let rows: Vec<ProductRow> = tx
        .prepare(
            "SELECT id, sku, barcode, name, price_cents, stock FROM legacy_products ORDER BY id",
        )?
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    let mut facts = HashMap::new();
    for (id, sku, barcode, name, price, stock) in rows {
        let sku = sku.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        let entity_id = format!("legacy-{id}");
        let mut data = serde_json::Map::new();
        data.insert("legacy_id".into(), id.into());
        data.insert("name".into(), name.clone().unwrap_or_default().into());
        if let Some(s) = &sku {
            data.insert("sku".into(), s.clone().into());
        }
        if let Some(b) = barcode.as_ref().map(|b| b.trim()).filter(|b| !b.is_empty()) {
            data.insert("barcode".into(), b.into());
        }
        if let Some(p) = price {
            data.insert("price_minor".into(), p.into());
        }
        let data = serde_json::Value::Object(data);
        tx.execute(
            "INSERT INTO catalog_entities (entity_type, entity_id, branch_id, version, deleted, hash, data, updated_at)
             VALUES ('product', ?1, NULL, 0, 0, ?2, ?3, ?4)",
            params![entity_id, entity_hash(&data), serde_json::to_string(&data)?, now_text],
        )?;
        tx.execute(
            "INSERT INTO catalog_id_map (legacy_id, legacy_entity_id, sku) VALUES (?1, ?2, ?3)",
            params![id, entity_id, sku],
        )?;
        if let Some(qty) = stock {
            tx.execute(
                "INSERT INTO local_inventory (product_id, qty, updated_at) VALUES (?1, ?2, ?3)",
                params![entity_id, qty, now_text],
            )?;
            report.inventory_rows += 1;
        }
        facts.insert(
            id,
            ProductFacts {
                sku,
                name: name.unwrap_or_default(),
            },
        );
        report.products += 1;
    }

    // sales → sales (+ sync_journal when Drive never got them)
    type SaleRow = (
        i64,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<String>,
        Option<i64>,
    );
    let rows: Vec<SaleRow> = tx
        .prepare("SELECT id, receipt_no, created_at, total_cents, lines_json, drive_synced FROM legacy_sales ORDER BY id")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))?
        .collect::<Result<_, _>>()?;
    let enrollment = read_enrollment(&tx)?;
    for (id, receipt_no, created_at, total, lines_json, drive_synced) in rows {
        let c = convert_sale(
            id,
            receipt_no.as_deref().unwrap_or(""),
            created_at.as_deref().unwrap_or(""),
            total.unwrap_or(0),
            lines_json.as_deref().unwrap_or(""),
            &facts,
            now,
        );
        report.sales += 1;
        if drive_synced.unwrap_or(0) != 0 {
            insert_sale_record(
                &tx,
                pos_id,
                None,
                c.event_type,
                c.occurred_at,
                &c.payload,
                Some(id),
                None,
                &now_text,
            )?;
            report.sales_history_only += 1;
            continue;
        }
        let needs_attention = c.problem.map(|m| {
            let code = ErrorCode::PosSyncEventInvalid;
            tracing::warn!(legacy_sale_id = id, errorCode = %code, message = %m, "legacy sale needs attention");
            (code.as_str().to_string(), m)
        });
        if needs_attention.is_some() {
            report.sales_needing_attention += 1;
        } else {
            report.sales_queued += 1;
        }
        insert_queued_sale(
            &tx,
            &QueuedSale {
                pos_id,
                event_type: c.event_type,
                occurred_at: c.occurred_at,
                payload: &c.payload,
                needs_attention,
                legacy_sale_id: Some(id),
                enrollment: enrollment.as_ref(),
                key: None,
            },
        )?;
    }
    report.migrated_at = Some(now);
    Kv::SyncState.set(&tx, "legacy_migrated_at", &now_text)?;
    Kv::SyncState.set(&tx, "legacy_report", &serde_json::to_string(&report)?)?;
    tx.commit()?;
    tracing::info!(
        products = report.products,
        sales = report.sales,
        queued = report.sales_queued,
        needs_attention = report.sales_needing_attention,
        "legacy database converted"
    );
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> HashMap<i64, ProductFacts> {
        HashMap::from([(
            1,
            ProductFacts {
                sku: Some("S1".into()),
                name: "Coffee".into(),
            },
        )])
    }

    #[test]
    fn a_consistent_legacy_sale_converts_to_a_valid_payload() {
        let c = convert_sale(
            9,
            "R9",
            "2026-10-01 09:15:00",
            850,
            r#"[{"product_id":1,"qty":2,"price_cents":450,"discount_cents":50}]"#,
            &facts(),
            Utc::now(),
        );
        assert_eq!(c.problem, None);
        assert_eq!(c.event_type, EventType::Sale);
        assert_eq!(c.occurred_at.to_rfc3339(), "2026-10-01T09:15:00+00:00");
        let line = &c.payload.lines[0];
        assert_eq!(
            (
                line.product_id.as_str(),
                line.sku.as_str(),
                line.total_minor
            ),
            ("legacy-1", "S1", 850)
        );
        assert_eq!(c.payload.payments[0].amount_minor, 850);
    }

    #[test]
    fn inconsistent_or_unreadable_sales_say_why() {
        let c = convert_sale(
            3,
            "R3",
            "2026-10-01 09:15:00",
            1,
            r#"[{"product_id":1,"qty":1,"price_cents":450}]"#,
            &facts(),
            Utc::now(),
        );
        assert!(
            c.problem
                .as_deref()
                .is_some_and(|m| m.contains("#3") && m.contains("total")),
            "{:?}",
            c.problem
        );
        let c = convert_sale(4, "", "yesterday", 0, "[", &facts(), Utc::now());
        let m = c.problem.expect("problem");
        assert!(m.contains("created_at") && m.contains("lines_json"), "{m}");
        assert_eq!(c.payload.receipt_no, "LEGACY-4");
    }

    #[test]
    fn negative_quantities_make_a_refund() {
        let c = convert_sale(
            5,
            "R5",
            "2026-10-01T09:15:00Z",
            -450,
            r#"[{"product_id":1,"qty":-1,"price_cents":450}]"#,
            &facts(),
            Utc::now(),
        );
        assert_eq!(c.event_type, EventType::Refund);
        assert_eq!(c.problem, None);
    }
}
