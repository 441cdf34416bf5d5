//! The local catalog copy: snapshot, delta and reconcile application, the reconcile manifest,
//! and offline lookups.
//!
//! Rules every write here keeps (they are what make replays and restarts harmless):
//! an upsert never puts an older version over a newer one, a tombstone deletes only a row
//! that is not newer than itself, and nothing here writes `sales` or `local_inventory`.

use chrono::{DateTime, Utc};
use possync_actors::CatalogPosition;
use possync_protocol::{DeltaPage, Entity, KeyRange, ManifestEntry, ReconcilePlan, SnapshotPage};
use rusqlite::{params, Connection, Transaction};
use serde::Serialize;

use super::error::TerminalStoreError;
use super::{parse_time, time_text, Kv};

/// Most results one lookup returns.
pub const LOOKUP_LIMIT: usize = 50;

/// An offline product lookup, over the `barcode`, `sku` and `name` fields of product data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogQuery {
    /// Exact barcode.
    Barcode(String),
    /// Exact SKU.
    Sku(String),
    /// Case-insensitive name search: prefix matches first, then names containing the text.
    Text(String),
}

/// Catalog summary for `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CatalogStats {
    /// Version the catalog is complete up to; `None` before the first snapshot finished.
    pub version: Option<i64>,
    /// Entities held locally.
    pub entities: i64,
    /// When the catalog last advanced.
    pub last_synced_at: Option<DateTime<Utc>>,
}

/// Which rule decides whether an incoming entity replaces the local row.
#[derive(Clone, Copy)]
enum Overwrite {
    /// Snapshot and delta: only a strictly newer version replaces the row.
    IfNewer,
    /// Reconcile: the plan is the cloud's truth at `cloud_version`, so it also replaces any
    /// row whose version is not beyond that (tampered data, or a version forged below it) and
    /// any row claiming a version beyond the catalog version this terminal ever reached (a
    /// version forged above it). A row between the two came by a delta while reconcile ran
    /// and is kept. Plan deletes follow the same rule.
    Reconcile {
        cloud_version: i64,
        local_catalog_version: i64,
    },
}

impl Overwrite {
    /// The `(cloud_version, local_catalog_version)` bounds bound to `?9`/`?10` of
    /// [`UPSERT_SQL`]; `NULL` for [`Overwrite::IfNewer`], which makes the extra terms null
    /// (false), leaving only the newer-version test.
    fn bounds(self) -> (Option<i64>, Option<i64>) {
        match self {
            Overwrite::IfNewer => (None, None),
            Overwrite::Reconcile {
                cloud_version,
                local_catalog_version,
            } => (Some(cloud_version), Some(local_catalog_version)),
        }
    }
}

const UPSERT_SQL: &str = "
INSERT INTO catalog_entities AS c
    (entity_type, entity_id, branch_id, version, deleted, hash, data, updated_at, snapshot_generation)
VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?7, ?8)
ON CONFLICT (entity_type, entity_id) DO UPDATE SET
    branch_id  = CASE WHEN (excluded.version > c.version OR c.version <= ?9 OR c.version > ?10) THEN excluded.branch_id  ELSE c.branch_id  END,
    hash       = CASE WHEN (excluded.version > c.version OR c.version <= ?9 OR c.version > ?10) THEN excluded.hash       ELSE c.hash       END,
    data       = CASE WHEN (excluded.version > c.version OR c.version <= ?9 OR c.version > ?10) THEN excluded.data       ELSE c.data       END,
    updated_at = CASE WHEN (excluded.version > c.version OR c.version <= ?9 OR c.version > ?10) THEN excluded.updated_at ELSE c.updated_at END,
    deleted    = CASE WHEN (excluded.version > c.version OR c.version <= ?9 OR c.version > ?10) THEN 0                  ELSE c.deleted    END,
    version    = CASE WHEN (excluded.version > c.version OR c.version <= ?9 OR c.version > ?10) THEN excluded.version    ELSE c.version    END,
    snapshot_generation = coalesce(excluded.snapshot_generation, c.snapshot_generation)";

/// A tombstone replaces a row that is not newer than itself. It is kept as a `deleted = 1`
/// row (hidden from lookups, the manifest and counts) so that a stale upsert of an older
/// version arriving later cannot resurrect the entity; the next snapshot completion purges it.
const TOMBSTONE_SQL: &str = "
INSERT INTO catalog_entities
    (entity_type, entity_id, branch_id, version, deleted, hash, data, updated_at, snapshot_generation)
VALUES (?1, ?2, ?3, ?4, 1, ?5, 'null', ?6, ?7)
ON CONFLICT (entity_type, entity_id) DO UPDATE SET
    branch_id = excluded.branch_id, version = excluded.version, deleted = 1, hash = excluded.hash,
    data = 'null', updated_at = excluded.updated_at,
    snapshot_generation = coalesce(excluded.snapshot_generation, catalog_entities.snapshot_generation)
WHERE excluded.version >= catalog_entities.version";

/// Writes entities in one transaction: each statement prepared once for the transaction
/// (not looked up per row), and one reused buffer for the serialised data, so a 1 000-entity
/// page costs no per-row allocation beyond what SQLite itself does.
struct EntityWriter<'t> {
    upsert: rusqlite::CachedStatement<'t>,
    tombstone: rusqlite::CachedStatement<'t>,
    /// Present while legacy products still wait for their cloud id.
    map_legacy: Option<rusqlite::CachedStatement<'t>>,
    rule: Overwrite,
    generation: Option<i64>,
    now: &'t str,
    data: Vec<u8>,
}

impl<'t> EntityWriter<'t> {
    fn new(
        tx: &'t Transaction<'_>,
        rule: Overwrite,
        generation: Option<i64>,
        now: &'t str,
    ) -> Result<EntityWriter<'t>, TerminalStoreError> {
        let map_legacy = if has_unmatched_legacy_ids(tx)? {
            Some(tx.prepare_cached(
                "UPDATE catalog_id_map SET cloud_entity_id = ?1, matched_at = ?2
                 WHERE sku = ?3 AND cloud_entity_id IS NULL",
            )?)
        } else {
            None
        };
        Ok(EntityWriter {
            upsert: tx.prepare_cached(UPSERT_SQL)?,
            tombstone: tx.prepare_cached(TOMBSTONE_SQL)?,
            map_legacy,
            rule,
            generation,
            now,
            data: Vec::with_capacity(1024),
        })
    }

    /// Upserts one entity (or records its tombstone) under the writer's rule.
    fn put(&mut self, e: &Entity) -> Result<(), TerminalStoreError> {
        if e.deleted {
            self.tombstone.execute(params![
                e.entity_type,
                e.id,
                e.branch_id,
                e.version,
                e.hash,
                self.now,
                self.generation,
            ])?;
            return Ok(());
        }
        self.data.clear();
        serde_json::to_writer(&mut self.data, &e.data)?;
        // serde_json writes UTF-8 only; bound as TEXT like every other data value.
        let data = std::str::from_utf8(&self.data)
            .map_err(|e| TerminalStoreError::Corrupt(format!("entity data is not UTF-8: {e}")))?;
        let (cloud_version, local_catalog_version) = self.rule.bounds();
        self.upsert.execute(params![
            e.entity_type,
            e.id,
            e.branch_id,
            e.version,
            e.hash,
            data,
            self.now,
            self.generation,
            cloud_version,
            local_catalog_version,
        ])?;
        if let Some(map) = &mut self.map_legacy {
            if e.entity_type == "product" && !e.id.starts_with("legacy-") {
                if let Some(sku) = e
                    .data
                    .get("sku")
                    .and_then(|s| s.as_str())
                    .filter(|s| !s.is_empty())
                {
                    map.execute(params![e.id, self.now, sku])?;
                }
            }
        }
        Ok(())
    }
}

/// Whether any legacy product still waits for its cloud id (skips the per-product matching
/// statement on terminals that never had a legacy database).
fn has_unmatched_legacy_ids(tx: &Transaction<'_>) -> Result<bool, rusqlite::Error> {
    tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM catalog_id_map WHERE cloud_entity_id IS NULL)",
        [],
        |r| r.get(0),
    )
}

/// Reads the catalog sync position from `catalog_meta`.
pub fn position(conn: &Connection) -> Result<CatalogPosition, TerminalStoreError> {
    let m = Kv::CatalogMeta;
    Ok(CatalogPosition {
        catalog_version: m.get_i64(conn, "catalog_version")?,
        snapshot_cursor: m.get(conn, "snapshot_cursor")?,
        snapshot_in_progress: m.get_i64(conn, "snapshot_in_progress")?.unwrap_or(0) != 0,
        snapshot_version: m.get_i64(conn, "snapshot_version")?,
        snapshot_received: m.get_i64(conn, "snapshot_received")?.unwrap_or(0),
        snapshot_total: m.get_i64(conn, "snapshot_total")?.unwrap_or(0),
        last_synced_at: m
            .get(conn, "last_synced_at")?
            .map(|s| parse_time(&s))
            .transpose()?,
    })
}

/// Stores one snapshot page in one transaction; see `LocalStore::apply_snapshot_page`.
///
/// Which rows a snapshot listed is remembered by stamping them with the snapshot's
/// generation number, so completion can delete the rest even after the snapshot was resumed
/// by a later process.
///
/// A page that is not the last commits as a `redoable_write` (`synchronous=NORMAL`): its rows
/// and cursor are one atomic transaction as always, and a kill -9 loses nothing, but a power
/// cut could lose the last few pages, and the snapshot then resumes from the last cursor that
/// reached the disk (the catalog is the cloud's and can be fetched again; a sale is a fact and
/// is never written this way). The last page commits with FULL, which makes every page before
/// it durable too (the WAL is sequential).
pub fn apply_snapshot_page(
    conn: &mut Connection,
    page: &SnapshotPage,
    started_fresh: bool,
) -> Result<(), TerminalStoreError> {
    if page.next_cursor.is_none() {
        return store_snapshot_page(conn, page, started_fresh);
    }
    super::redoable_write(conn, |c| store_snapshot_page(c, page, started_fresh))
}

fn store_snapshot_page(
    conn: &mut Connection,
    page: &SnapshotPage,
    started_fresh: bool,
) -> Result<(), TerminalStoreError> {
    let m = Kv::CatalogMeta;
    let now = time_text(Utc::now());
    let tx = conn.transaction()?;
    let generation = if started_fresh {
        let g = m.get_i64(&tx, "snapshot_generation")?.unwrap_or(0) + 1;
        m.set(&tx, "snapshot_generation", &g.to_string())?;
        m.set(&tx, "snapshot_version", &page.snapshot_version.to_string())?;
        m.set(&tx, "snapshot_total", &page.total.to_string())?;
        m.set(&tx, "snapshot_received", "0")?;
        m.set(&tx, "snapshot_in_progress", "1")?;
        g
    } else {
        let in_progress = m.get_i64(&tx, "snapshot_in_progress")?.unwrap_or(0) != 0;
        let g = m.get_i64(&tx, "snapshot_generation")?;
        match (in_progress, g) {
            (true, Some(g)) => g,
            _ => {
                return Err(TerminalStoreError::Corrupt(
                    "snapshot page continues a snapshot that was never started".into(),
                ))
            }
        }
    };
    {
        let mut writer = EntityWriter::new(&tx, Overwrite::IfNewer, Some(generation), &now)?;
        for e in &page.entities {
            writer.put(e)?;
        }
    }
    let received = m.get_i64(&tx, "snapshot_received")?.unwrap_or(0) + page.entities.len() as i64;
    m.set(&tx, "snapshot_received", &received.to_string())?;
    match &page.next_cursor {
        Some(cursor) => m.set(&tx, "snapshot_cursor", cursor)?,
        None => {
            let snapshot_version = m
                .get_i64(&tx, "snapshot_version")?
                .unwrap_or(page.snapshot_version);
            let removed = tx.execute(
                "DELETE FROM catalog_entities
                 WHERE (snapshot_generation IS NULL OR snapshot_generation <> ?1) AND version <= ?2",
                params![generation, snapshot_version],
            )?;
            m.delete(&tx, "snapshot_cursor")?;
            m.set(&tx, "snapshot_in_progress", "0")?;
            m.set(&tx, "catalog_version", &snapshot_version.to_string())?;
            m.set(&tx, "last_synced_at", &now)?;
            tracing::info!(
                snapshot_version,
                received,
                removed,
                "catalog snapshot complete"
            );
        }
    }
    tx.commit()?;
    Ok(())
}

/// Applies a delta page in one transaction; see `LocalStore::apply_delta_page`.
pub fn apply_delta_page(conn: &mut Connection, page: &DeltaPage) -> Result<(), TerminalStoreError> {
    let now = time_text(Utc::now());
    let tx = conn.transaction()?;
    {
        let mut writer = EntityWriter::new(&tx, Overwrite::IfNewer, None, &now)?;
        for e in &page.changes {
            writer.put(e)?;
        }
    }
    let m = Kv::CatalogMeta;
    m.set(&tx, "catalog_version", &page.next_since.to_string())?;
    m.set(&tx, "last_synced_at", &now)?;
    tx.commit()?;
    Ok(())
}

/// Forgets the delta position and any snapshot in progress; local entities stay.
pub fn require_resnapshot(conn: &mut Connection) -> Result<(), TerminalStoreError> {
    let tx = conn.transaction()?;
    let m = Kv::CatalogMeta;
    m.delete(&tx, "catalog_version")?;
    m.delete(&tx, "snapshot_cursor")?;
    m.set(&tx, "snapshot_in_progress", "0")?;
    tx.commit()?;
    Ok(())
}

/// Splits a `type/id` key at its first `/` (types never contain one).
fn split_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or((key, ""))
}

/// Up to `limit` manifest entries after `after`, in bytewise key order. Because types are
/// `[a-z_]` and `/` sorts below all of those, `(type, id)` order equals key order.
/// The hash of stored entity data, recomputed (never read from the `hash` column, which a row
/// edited behind the store's back keeps).
fn recomputed_hash(data: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(data) {
        Ok(v) => possync_protocol::entity_hash(&v),
        Err(_) => format!(
            "unparseable-{}",
            possync_protocol::sha256_hex(data.as_bytes())
        ),
    }
}

/// Visits every live entity as `(key, manifest entry)`, hash recomputed from its data. Runs
/// on its own read-only connection to the database file: under WAL a reader never blocks the
/// writer, so sales keep committing while a verify reads 100 000 rows.
fn scan_live_catalog(
    path: &std::path::Path,
    wanted: impl Fn(&str) -> bool,
    mut visit: impl FnMut(&str, ManifestEntry),
) -> Result<(), TerminalStoreError> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mut stmt = conn.prepare(
        "SELECT entity_type, entity_id, version, data FROM catalog_entities WHERE deleted = 0",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let entity_type: String = r.get(0)?;
        let id: String = r.get(1)?;
        let key = format!("{entity_type}/{id}");
        // Hashing the data is most of the cost: rows nobody asked about are not hashed.
        if !wanted(&key) {
            continue;
        }
        let data: String = r.get(3)?;
        visit(
            &key,
            ManifestEntry {
                entity_type,
                id,
                version: r.get(2)?,
                hash: recomputed_hash(&data),
            },
        );
    }
    Ok(())
}

/// The fingerprint tree of the local catalog (see `possync_protocol::fingerprint`).
pub fn fingerprint_tree(
    path: &std::path::Path,
) -> Result<possync_protocol::fingerprint::FingerprintTree, TerminalStoreError> {
    let mut tree = possync_protocol::fingerprint::FingerprintTree::default();
    scan_live_catalog(path, |_| true, |key, e| tree.add(key, e.version, &e.hash))?;
    Ok(tree)
}

/// The manifest entries of the live entities in `leaves`, in key order.
pub fn manifest_in_leaves(
    path: &std::path::Path,
    leaves: &[u32],
) -> Result<Vec<ManifestEntry>, TerminalStoreError> {
    let wanted: std::collections::HashSet<u32> = leaves.iter().copied().collect();
    let mut out = Vec::new();
    scan_live_catalog(
        path,
        |key| wanted.contains(&possync_protocol::fingerprint::leaf_of(key)),
        |_, e| out.push(e),
    )?;
    out.sort_by(|a, b| (&a.entity_type, &a.id).cmp(&(&b.entity_type, &b.id)));
    Ok(out)
}

pub fn manifest_after(
    conn: &Connection,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<ManifestEntry>, TerminalStoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    // The hash is recomputed from the stored data, not read from the `hash` column: reconcile
    // exists to catch local drift, and a row edited behind the store's back keeps its old hash.
    let map = |r: &rusqlite::Row<'_>| {
        let data: String = r.get(4)?;
        let hash = recomputed_hash(&data);
        Ok(ManifestEntry {
            entity_type: r.get(0)?,
            id: r.get(1)?,
            version: r.get(2)?,
            hash,
        })
    };
    let rows = match after {
        None => conn
            .prepare_cached(
                "SELECT entity_type, entity_id, version, hash, data FROM catalog_entities
                 WHERE deleted = 0
                 ORDER BY entity_type, entity_id LIMIT ?1",
            )?
            .query_map(params![limit], map)?
            .collect::<Result<Vec<_>, _>>()?,
        Some(key) => {
            let (t, id) = split_key(key);
            conn.prepare_cached(
                "SELECT entity_type, entity_id, version, hash, data FROM catalog_entities
                 WHERE (entity_type > ?1 OR (entity_type = ?1 AND entity_id > ?2)) AND deleted = 0
                 ORDER BY entity_type, entity_id LIMIT ?3",
            )?
            .query_map(params![t, id, limit], map)?
            .collect::<Result<Vec<_>, _>>()?
        }
    };
    Ok(rows)
}

/// Applies one reconcile range's plan in one transaction (catalog tables only).
pub fn apply_reconcile_plan(
    conn: &mut Connection,
    range: &KeyRange,
    plan: &ReconcilePlan,
    cloud_version: i64,
) -> Result<(), TerminalStoreError> {
    let now = time_text(Utc::now());
    let tx = conn.transaction()?;
    let local_catalog_version = Kv::CatalogMeta
        .get_i64(&tx, "catalog_version")?
        .unwrap_or(i64::MAX);
    {
        let rule = Overwrite::Reconcile {
            cloud_version,
            local_catalog_version,
        };
        let mut writer = EntityWriter::new(&tx, rule, None, &now)?;
        for e in &plan.upserts {
            if !range.contains(e.key().as_str()) {
                tracing::warn!(key = %e.key(), "reconcile plan entry outside its range; applied anyway");
            }
            writer.put(e)?;
        }
    }
    for d in &plan.deletes {
        // The `Overwrite::Reconcile` rule: a row between the plan's version and the local
        // catalog version came by a delta while reconcile ran and stays.
        tx.prepare_cached(
            "DELETE FROM catalog_entities \
             WHERE entity_type = ?1 AND entity_id = ?2 AND (version <= ?3 OR version > ?4)",
        )?
        .execute(params![
            d.entity_type,
            d.id,
            cloud_version,
            local_catalog_version
        ])?;
    }
    tx.commit()?;
    Ok(())
}

fn entity_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Entity, String)> {
    let data: String = r.get(6)?;
    Ok((
        Entity {
            entity_type: r.get(0)?,
            id: r.get(1)?,
            branch_id: r.get(2)?,
            version: r.get(3)?,
            deleted: r.get::<_, i64>(4)? != 0,
            hash: r.get(5)?,
            data: serde_json::Value::Null,
        },
        data,
    ))
}

const ENTITY_COLUMNS: &str = "entity_type, entity_id, branch_id, version, deleted, hash, data";

/// Escapes `*`, `?` and `[` so a user's text matches literally in a GLOB pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '*' => out.push_str("[*]"),
            '?' => out.push_str("[?]"),
            '[' => out.push_str("[[]"),
            other => out.push(other),
        }
    }
    out
}

/// Offline product lookup through the generated-column indexes.
pub fn lookup(conn: &Connection, q: &CatalogQuery) -> Result<Vec<Entity>, TerminalStoreError> {
    let limit = LOOKUP_LIMIT as i64;
    let found: Vec<(Entity, String)> = match q {
        CatalogQuery::Barcode(b) => conn
            .prepare_cached(&format!(
                "SELECT {ENTITY_COLUMNS} FROM catalog_entities INDEXED BY catalog_entities_product_barcode
                 WHERE entity_type = 'product' AND deleted = 0 AND barcode = ?1 ORDER BY entity_id LIMIT ?2"
            ))?
            .query_map(params![b, limit], entity_from_row)?
            .collect::<Result<_, _>>()?,
        CatalogQuery::Sku(s) => conn
            .prepare_cached(&format!(
                "SELECT {ENTITY_COLUMNS} FROM catalog_entities INDEXED BY catalog_entities_product_sku
                 WHERE entity_type = 'product' AND deleted = 0 AND sku = ?1 ORDER BY entity_id LIMIT ?2"
            ))?
            .query_map(params![s, limit], entity_from_row)?
            .collect::<Result<_, _>>()?,
        CatalogQuery::Text(text) => {
            let folded = text.trim().to_lowercase();
            if folded.is_empty() {
                return Ok(Vec::new());
            }
            // Prefix: a GLOB range seek on the name index (GLOB is case-sensitive, and the
            // column is already lower-cased, so SQLite can turn the pattern into a range).
            let mut rows: Vec<(Entity, String)> = conn
                .prepare_cached(&format!(
                    "SELECT {ENTITY_COLUMNS} FROM catalog_entities INDEXED BY catalog_entities_product_name
                     WHERE entity_type = 'product' AND deleted = 0 AND name_fold GLOB ?1
                     ORDER BY name_fold, entity_id LIMIT ?2"
                ))?
                .query_map(params![format!("{}*", glob_escape(&folded)), limit], entity_from_row)?
                .collect::<Result<_, _>>()?;
            if rows.len() < LOOKUP_LIMIT {
                // Substring: a scan, but of the name index (no JSON parsing per row).
                let more: Vec<(Entity, String)> = conn
                    .prepare_cached(&format!(
                        "SELECT {ENTITY_COLUMNS} FROM catalog_entities INDEXED BY catalog_entities_product_name
                         WHERE entity_type = 'product' AND deleted = 0
                           AND instr(name_fold, ?1) > 1
                         ORDER BY name_fold, entity_id LIMIT ?2"
                    ))?
                    .query_map(params![folded, limit - rows.len() as i64], entity_from_row)?
                    .collect::<Result<_, _>>()?;
                rows.extend(more);
            }
            rows
        }
    };
    found
        .into_iter()
        .map(|(mut e, data)| {
            e.data = serde_json::from_str(&data)?;
            Ok(e)
        })
        .collect()
}

/// Live entities; answered from the `catalog_entities_live` index (this runs on every
/// `/status` and `/metrics` request, under the store's one connection).
const COUNT_LIVE_SQL: &str = "SELECT count(*) FROM catalog_entities WHERE deleted = 0";

/// Catalog summary for `/status`.
pub fn stats(conn: &Connection) -> Result<CatalogStats, TerminalStoreError> {
    let entities: i64 = conn.query_row(COUNT_LIVE_SQL, [], |r| r.get(0))?;
    let pos = position(conn)?;
    Ok(CatalogStats {
        version: pos.catalog_version,
        entities,
        last_synced_at: pos.last_synced_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns_are_escaped() {
        assert_eq!(glob_escape("a*b?[c]"), "a[*]b[?][[]c]");
    }

    #[test]
    fn the_live_entity_count_reads_the_partial_index_not_the_table() {
        let mut conn = Connection::open_in_memory().expect("open");
        crate::store::schema::apply_pending(&mut conn, crate::store::schema::latest_version())
            .expect("schema");
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {COUNT_LIVE_SQL}"))
            .expect("explain")
            .query_map([], |r| r.get::<_, String>(3))
            .expect("plan")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert!(
            plan.iter()
                .any(|step| step.contains("catalog_entities_live")),
            "plan: {plan:?}"
        );
    }

    #[test]
    fn keys_split_at_the_first_slash() {
        assert_eq!(split_key("product/a/b"), ("product", "a/b"));
        assert_eq!(split_key("product"), ("product", ""));
    }
}
