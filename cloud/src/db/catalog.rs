//! Catalog truth: entities, the cloud-wide version counter, snapshot, delta and reconcile.

use possync_protocol::{DeltaPage, Entity, ReconcileRequest, ReconcileResponse, SnapshotPage};
use thiserror::Error;

use super::{DbConn, StoreError};

/// One entity to create or replace.
#[derive(Debug, Clone)]
pub struct EntityWrite {
    pub entity_type: String,
    pub id: String,
    pub branch_id: Option<String>,
    pub data: serde_json::Value,
}

/// Catalog failures, mapped by the service to the `POS_CATALOG_*` codes.
#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("bad snapshot cursor: {0}")]
    BadCursor(String),
    #[error("bad since: {0}")]
    BadSince(String),
    #[error("since is older than the retained history (horizon {horizon}); resnapshot required")]
    ResnapshotRequired { horizon: i64 },
    #[error("bad manifest: {0}")]
    BadManifest(String),
    #[error("manifest has more than {max_entries} entries")]
    ManifestTooLarge { max_entries: usize },
    #[error("invalid entity: {0}")]
    InvalidEntity(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates or replaces entities in one transaction.
pub fn upsert_entities(
    _conn: &mut DbConn,
    _writes: &[EntityWrite],
) -> Result<Vec<Entity>, CatalogError> {
    todo!()
}

/// Turns entities into tombstones; unknown keys are ignored.
pub fn delete_entities(
    _conn: &mut DbConn,
    _keys: &[(String, String)],
) -> Result<Vec<Entity>, CatalogError> {
    todo!()
}

/// The catalog's current version.
pub fn current_version(_conn: &mut DbConn) -> Result<i64, CatalogError> {
    todo!()
}

/// One snapshot page for `branch_id`.
pub fn snapshot_page(
    _conn: &mut DbConn,
    _branch_id: &str,
    _cursor: Option<&str>,
    _limit: u32,
) -> Result<SnapshotPage, CatalogError> {
    todo!()
}

/// Changes after `since` visible to `branch_id`.
pub fn delta_page(
    _conn: &mut DbConn,
    _branch_id: &str,
    _since: i64,
    _limit: u32,
) -> Result<DeltaPage, CatalogError> {
    todo!()
}

/// Compares a terminal's manifest with the truth for one key range.
pub fn reconcile(
    _conn: &mut DbConn,
    _branch_id: &str,
    _req: &ReconcileRequest,
    _max_entries: usize,
) -> Result<ReconcileResponse, CatalogError> {
    todo!()
}

/// Deletes tombstones older than `older_than`, raising the delta horizon.
pub fn purge_tombstones(
    _conn: &mut DbConn,
    _older_than: chrono::Duration,
) -> Result<usize, CatalogError> {
    todo!()
}
