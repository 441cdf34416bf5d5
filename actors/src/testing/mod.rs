//! Test support shared by this crate's tests and the simulations: an in-memory [`LocalStore`]
//! with the contract's semantics, a scriptable in-memory [`CloudApi`] with the cloud's
//! idempotency and paging rules, and a clock tests move by hand.
//!
//! One file per fake: `clock` (`ManualClock`), `memory_store` (`MemoryStore`, which keeps
//! the `LocalStore` contract — `crate::store_contract`), `fake_cloud` (`FakeCloud`, which
//! keeps the `CloudApi` contract — `crate::cloud_contract`).
//!
//! Faults are injected by script (`fail_next`, `fault_next`, `set_offline`), never by timing,
//! so a test that uses them is deterministic in what it asserts.

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use possync_protocol::fingerprint::{
    leaf_of, FingerprintRequest, FingerprintResponse, FingerprintTree, LeafReconcileRequest,
};
use possync_protocol::{
    entity_hash, validate_event, DeltaPage, Entity, EntityKey, EntityRef, ErrorCode, EventResult,
    EventStatus, EventType, KeyRange, ManifestEntry, ReconcileMode, ReconcilePlan,
    ReconcileRequest, ReconcileResponse, ReconcileSummary, SaleEvent, SalesEventsResponse,
    SnapshotPage,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use uuid::Uuid;

use crate::code::TerminalCode;
use crate::ports::{
    CatalogPosition, Clock, CloudApi, CloudError, DeliveryOutcome, FailureHistory, JournalId,
    LocalStore, OutboxCounts, OutboxItem, StoreError, Traffic,
};

/// The fingerprint tree of the live entities of a key → entity map: how the fake store and the
/// fake cloud both see their catalogs (the real ones compute the same from their tables).
fn live_tree(entities: &BTreeMap<String, Entity>) -> FingerprintTree {
    let mut tree = FingerprintTree::default();
    for (k, e) in entities.iter().filter(|(_, e)| !e.deleted) {
        tree.add(k, e.version, &e.hash);
    }
    tree
}

/// What a manifest says of a held entity.
fn manifest_entry(e: &Entity) -> ManifestEntry {
    ManifestEntry {
        entity_type: e.entity_type.clone(),
        id: e.id.clone(),
        version: e.version,
        hash: e.hash.clone(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builds an entity whose hash matches its data.
pub fn entity(entity_type: &str, id: &str, version: i64, data: serde_json::Value) -> Entity {
    Entity {
        entity_type: entity_type.into(),
        id: id.into(),
        version,
        deleted: false,
        branch_id: None,
        hash: entity_hash(&data),
        data,
    }
}

/// A valid one-line cash sale (2 × 250 minor units; the testkit's payload builder).
pub fn sale_event(terminal_id: Uuid, pos_id: Uuid, local_event_id: i64) -> SaleEvent {
    SaleEvent {
        terminal_id,
        pos_id,
        local_event_id,
        branch_id: "b1".into(),
        event_type: EventType::Sale,
        occurred_at: Utc
            .with_ymd_and_hms(2026, 11, 25, 10, 0, 0)
            .single()
            .unwrap_or_default(),
        payload: possync_testkit::one_line_payload(&format!("B1-T1-{local_event_id:06}"), 2, 250),
        chain_hash: None,
    }
}

/// Waits until `cond` holds, polling every few milliseconds; panics with `what` after a
/// generous deadline (30 s) so a stuck engine fails the test instead of hanging it.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

mod clock;
mod fake_cloud;
mod memory_store;

pub use clock::ManualClock;
pub use fake_cloud::{CloudFault, Endpoint, FakeCloud};
pub use memory_store::{MemJournalRow, MemoryStore, StoreFault, StoreOp};

/// A fresh store, cloud and clock, shared as the engine wants them.
pub fn world() -> (Arc<MemoryStore>, Arc<FakeCloud>, Arc<ManualClock>) {
    (
        Arc::new(MemoryStore::new()),
        Arc::new(FakeCloud::new()),
        Arc::new(ManualClock::default()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fake_cloud_pages_the_snapshot_and_reports_deltas_with_tombstones() {
        let cloud = FakeCloud::new();
        cloud.seed_products(5);
        let p1 = cloud.snapshot(None, 2).await.expect("page");
        assert_eq!((p1.entities.len(), p1.total), (2, 5));
        let p2 = cloud
            .snapshot(p1.next_cursor.as_deref(), 2)
            .await
            .expect("page");
        assert_eq!(p2.entities[0].id, "p00003");
        cloud.delete("product", "p00001");
        let d = cloud.delta(5, 100).await.expect("delta");
        assert_eq!(d.changes.len(), 1);
        assert!(d.changes[0].deleted);
        assert_eq!(d.next_since, 6);
    }

    #[tokio::test]
    async fn fake_cloud_ledger_is_idempotent() {
        let cloud = FakeCloud::new();
        let ev = sale_event(Uuid::nil(), Uuid::nil(), 1);
        let first = cloud
            .post_events(std::slice::from_ref(&ev), 1)
            .await
            .expect("post");
        let again = cloud
            .post_events(std::slice::from_ref(&ev), 1)
            .await
            .expect("post");
        assert_eq!(first.results[0].status, EventStatus::Accepted);
        assert_eq!(again.results[0].status, EventStatus::Duplicate);
        assert_eq!(
            again.results[0].cloud_event_id,
            first.results[0].cloud_event_id
        );
        let mut changed = ev.clone();
        changed.payload.receipt_no = "other".into();
        let c = cloud.post_events(&[changed], 1).await.expect("post");
        assert_eq!(c.results[0].status, EventStatus::Conflict);
        assert_eq!(cloud.stored_events(), 1);
    }

    #[test]
    fn memory_store_guards_versions_and_claims_due_rows_only() {
        let store = MemoryStore::new();
        let newer = entity("product", "a", 5, serde_json::json!({"v": 5}));
        let older = entity("product", "a", 3, serde_json::json!({"v": 3}));
        store
            .apply_delta_page(&DeltaPage {
                changes: vec![newer.clone(), older],
                next_since: 5,
                has_more: false,
                catalog_version: 5,
            })
            .expect("delta");
        assert_eq!(store.entities()["product/a"], newer);
        store.enqueue(sale_event(Uuid::nil(), Uuid::nil(), 1));
        let now = Utc::now();
        let claimed = store.claim_batch(10, now).expect("claim");
        assert_eq!(claimed.len(), 1);
        store
            .record_outcomes(&[DeliveryOutcome::RetryLater {
                journal_id: claimed[0].journal_id,
                failure: crate::ports::TransientFailure::NoAnswer,
                failed_at: now,
                not_before: now + chrono::Duration::seconds(10),
                code: TerminalCode::Network,
                message: "x".into(),
            }])
            .expect("record");
        assert!(store.claim_batch(10, now).expect("claim").is_empty());
        assert_eq!(
            store
                .claim_batch(10, now + chrono::Duration::seconds(11))
                .expect("claim")
                .len(),
            1
        );
    }
}
