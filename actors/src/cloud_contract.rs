//! The contract of [`CloudApi`] where the engine's correctness rests on it — the idempotent
//! sales ledger, snapshot paging and deltas — written once and run against the scriptable
//! fake the engine tests use ([`crate::testing::FakeCloud`], in this crate's tests) and
//! against a real `cloud serve` through the terminal's HTTP client (in the terminal's tests).
//!
//! [`cloud_contract!`] expands the cases into one `#[tokio::test]` each.
//!
//! [`cloud_contract!`]: macro@crate::cloud_contract

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use possync_protocol::{EventStatus, SaleEvent};
use uuid::Uuid;

use crate::ports::CloudApi;
use crate::testing::sale_event;

/// An operator's catalog edit in progress.
pub type CatalogEdit = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Makes an operator's edit of product `(id, name)`.
pub type CatalogEditor = Box<dyn Fn(&str, &str) -> CatalogEdit + Send + Sync>;

/// One cloud under test, with an empty catalog and ledger.
pub struct Subject {
    /// The cloud, through the port the engine uses (authenticated as one terminal).
    pub cloud: Arc<dyn CloudApi>,
    /// The terminal the port speaks for (sales carry it).
    pub terminal_id: Uuid,
    /// Its branch.
    pub branch_id: String,
    /// Adds or changes a product for every branch (an operator's edit) — the catalog's
    /// writer is not part of the port.
    pub upsert_product: CatalogEditor,
    /// Whatever must live as long as the cloud (a process, a database).
    pub keep: Box<dyn std::any::Any + Send + Sync>,
}

impl Subject {
    fn sale(&self, pos_id: Uuid, local_event_id: i64) -> SaleEvent {
        let mut e = sale_event(self.terminal_id, pos_id, local_event_id);
        e.branch_id = self.branch_id.clone();
        e
    }

    async fn upsert(&self, id: &str, name: &str) {
        (self.upsert_product)(id, name).await;
    }
}

/// A sale is stored once: its resend is answered `duplicate` with the first cloud id.
pub async fn a_resent_sale_is_a_duplicate_of_the_stored_one(s: Subject) {
    let pos = Uuid::now_v7();
    let sales = [s.sale(pos, 1), s.sale(pos, 2)];
    let first = s.cloud.post_events(&sales, 1).await.expect("post");
    assert_eq!(first.results.len(), 2);
    assert!(first
        .results
        .iter()
        .all(|r| r.status == EventStatus::Accepted && r.cloud_event_id.is_some()));
    let again = s.cloud.post_events(&sales[..1], 2).await.expect("resend");
    assert_eq!(again.results.len(), 1);
    assert_eq!(again.results[0].status, EventStatus::Duplicate);
    assert_eq!(
        again.results[0].cloud_event_id,
        first.results[0].cloud_event_id
    );
    assert_eq!(again.results[0].local_event_id, Some(1));
}

/// A different sale under a stored key is not stored: `conflict`.
pub async fn a_different_sale_under_a_stored_key_is_a_conflict(s: Subject) {
    let pos = Uuid::now_v7();
    let original = s.sale(pos, 1);
    s.cloud
        .post_events(std::slice::from_ref(&original), 1)
        .await
        .expect("post");
    let mut changed = original;
    changed.payload.receipt_no.push_str("-changed");
    let answer = s.cloud.post_events(&[changed], 1).await.expect("post");
    assert_eq!(answer.results[0].status, EventStatus::Conflict);
    assert!(answer.results[0].code.is_some());
}

/// A snapshot pages every live entity exactly once, at one version, and ends without a cursor.
pub async fn a_snapshot_pages_every_entity_once(s: Subject) {
    for i in 0..5 {
        s.upsert(&format!("p{i}"), &format!("Product {i}")).await;
    }
    let mut seen = BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut version = None;
    for _ in 0..10 {
        let page = s.cloud.snapshot(cursor.as_deref(), 2).await.expect("page");
        assert!(page.entities.len() <= 2);
        assert_eq!(page.total, 5);
        assert_eq!(
            *version.get_or_insert(page.snapshot_version),
            page.snapshot_version
        );
        for e in &page.entities {
            assert!(seen.insert(e.key().as_str().to_string()), "{} twice", e.id);
            assert_eq!(e.hash, possync_protocol::entity_hash(&e.data));
        }
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(cursor, None, "the snapshot ends");
    assert_eq!(seen.len(), 5);
}

/// A delta from the current version is empty; a change made after it shows up in the next one.
pub async fn a_delta_brings_changes_made_after_its_position(s: Subject) {
    s.upsert("p1", "first").await;
    let page = s.cloud.snapshot(None, 100).await.expect("snapshot");
    let at = page.snapshot_version;
    let quiet = s.cloud.delta(at, 100).await.expect("delta");
    assert!(quiet.changes.is_empty());
    assert_eq!(quiet.next_since, at);
    s.upsert("p1", "renamed").await;
    let moved = s.cloud.delta(at, 100).await.expect("delta");
    assert_eq!(moved.changes.len(), 1);
    assert_eq!(moved.changes[0].id, "p1");
    assert_eq!(moved.changes[0].data["name"], "renamed");
    assert!(moved.next_since > at);
    assert!(!moved.has_more);
}

/// The cloud answers its readiness probe while it serves.
pub async fn the_probe_answers(s: Subject) {
    s.cloud.probe().await.expect("probe");
}

/// Expands into one `#[tokio::test]` per case of the [`CloudApi`] contract, each on a fresh
/// subject from `$make: async fn() -> Subject`.
#[macro_export]
macro_rules! cloud_contract {
    ($make:path) => {
        $crate::cloud_contract!(@cases $make;
            a_resent_sale_is_a_duplicate_of_the_stored_one,
            a_different_sale_under_a_stored_key_is_a_conflict,
            a_snapshot_pages_every_entity_once,
            a_delta_brings_changes_made_after_its_position,
            the_probe_answers,
        );
    };
    (@cases $make:path; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                $crate::cloud_contract::$case($make().await).await;
            }
        )+
    };
}
