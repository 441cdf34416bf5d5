//! The till's own stock (`local_inventory`): counted on the till, never synced (inventory sync
//! is a non-goal), and kept under the legacy product id when the legacy migration matched one.

use chrono::Utc;
use rusqlite::{params, Connection, OptionalExtension};

use super::error::TerminalStoreError;
use super::time_text;

/// The key a product's stock is counted under: itself, or the legacy id it was matched from.
fn inventory_key(conn: &Connection, product_id: &str) -> Result<String, TerminalStoreError> {
    let direct: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM local_inventory WHERE product_id = ?1",
            [product_id],
            |r| r.get(0),
        )
        .optional()?;
    if direct.is_some() {
        return Ok(product_id.to_string());
    }
    let legacy: Option<String> = conn
        .query_row(
            "SELECT m.legacy_entity_id FROM catalog_id_map m
             JOIN local_inventory i ON i.product_id = m.legacy_entity_id
             WHERE m.cloud_entity_id = ?1 ORDER BY m.legacy_id LIMIT 1",
            [product_id],
            |r| r.get(0),
        )
        .optional()?;
    Ok(legacy.unwrap_or_else(|| product_id.to_string()))
}

/// Local stock of a product (see `SqliteStore::local_inventory`).
pub fn local_inventory(
    conn: &Connection,
    product_id: &str,
) -> Result<Option<i64>, TerminalStoreError> {
    let key = inventory_key(conn, product_id)?;
    Ok(conn
        .query_row(
            "SELECT qty FROM local_inventory WHERE product_id = ?1",
            [key],
            |r| r.get(0),
        )
        .optional()?)
}

/// Adds `delta` to a product's stock in one transaction; returns the new quantity.
pub fn adjust_local_inventory(
    conn: &mut Connection,
    product_id: &str,
    delta: i64,
) -> Result<i64, TerminalStoreError> {
    let tx = conn.transaction()?;
    let key = inventory_key(&tx, product_id)?;
    let qty: i64 = tx.query_row(
        "INSERT INTO local_inventory (product_id, qty, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (product_id) DO UPDATE SET qty = qty + excluded.qty, updated_at = excluded.updated_at
         RETURNING qty",
        params![key, delta, time_text(Utc::now())],
        |r| r.get(0),
    )?;
    tx.commit()?;
    Ok(qty)
}
