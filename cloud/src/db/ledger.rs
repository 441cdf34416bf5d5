//! Exactly-once sales ingestion: the idempotency ledger and the append-only sales events.

use possync_protocol::{SaleEvent, SyncStatus};
use uuid::Uuid;

use super::{DbConn, StoreError};

/// One validated event with its payload hash.
#[derive(Debug, Clone)]
pub struct IngestRequest {
    pub event: SaleEvent,
    pub payload_hash: String,
}

/// What happened to one event of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    Accepted { cloud_event_id: Uuid },
    Duplicate { cloud_event_id: Uuid },
    Conflict { cloud_event_id: Uuid },
}

/// Ingests a batch in one transaction; outcomes in batch order.
pub fn ingest_batch(
    _conn: &mut DbConn,
    _batch: &[IngestRequest],
) -> Result<Vec<IngestOutcome>, StoreError> {
    todo!()
}

/// Per `pos_id` ingestion progress of one terminal.
pub fn sync_status(
    _conn: &mut DbConn,
    _terminal_id: Uuid,
    _branch_id: &str,
) -> Result<SyncStatus, StoreError> {
    todo!()
}

/// Number of stored sales events, optionally of one branch.
pub fn count_sales(_conn: &mut DbConn, _branch_id: Option<&str>) -> Result<i64, StoreError> {
    todo!()
}
