//! The contract of [`LocalStore`]: what every store the engine runs on must do, written once
//! and run against each implementation — the in-memory fake the engine tests use
//! ([`crate::testing::MemoryStore`], in this crate's tests) and the terminal's `SqliteStore`
//! (in the terminal's tests). An engine test that passes on the fake then says something about
//! the till: the fake cannot drift from the real store without this suite failing.
//!
//! Each case is a plain function over a fresh [`Subject`]; [`local_store_contract!`] expands
//! them into one `#[test]` each, so a failure names the broken promise.
//!
//! [`local_store_contract!`]: crate::local_store_contract

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use possync_protocol::fingerprint::{leaf_of, FingerprintTree, NodeId};
use possync_protocol::{
    DeltaPage, Entity, EntityKey, EntityRef, KeyRange, ManifestEntry, ReconcilePlan, SnapshotPage,
};

use crate::code::TerminalCode;
use crate::ports::{DeliveryOutcome, JournalId, LocalStore, TransientFailure};
use crate::testing::entity;

/// One store under test, fresh and empty (enrolled, where the store needs that to deliver).
pub struct Subject {
    /// The store, through the port the engine uses.
    pub store: Arc<dyn LocalStore>,
    /// Records one valid sale as `pending` — the checkout's job, which the port leaves out —
    /// and returns its journal id. Sales get increasing `local_event_id`s in call order.
    pub record_sale: Box<dyn Fn() -> JournalId + Send + Sync>,
    /// Whatever must live as long as the store (a temporary directory).
    pub keep: Box<dyn std::any::Any + Send + Sync>,
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0)
        .single()
        .unwrap_or_default()
}

fn product(id: &str, version: i64, name: &str) -> Entity {
    entity(
        "product",
        id,
        version,
        serde_json::json!({"name": name, "price_minor": 100 + version}),
    )
}

fn page(
    entities: Vec<Entity>,
    version: i64,
    total: i64,
    next_cursor: Option<&str>,
) -> SnapshotPage {
    SnapshotPage {
        snapshot_version: version,
        entities,
        next_cursor: next_cursor.map(str::to_string),
        total,
    }
}

fn keys(entries: &[ManifestEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| EntityKey::new(&e.entity_type, &e.id).as_str().to_string())
        .collect()
}

/// The key of product `id`, as the store orders keys.
fn k(id: &str) -> String {
    EntityKey::new("product", id).as_str().to_string()
}

fn manifest(s: &Subject) -> Vec<ManifestEntry> {
    s.store.manifest_after(None, 10_000).expect("manifest")
}

fn version_of(s: &Subject, id: &str) -> Option<i64> {
    manifest(s)
        .into_iter()
        .find(|e| e.entity_type == "product" && e.id == id)
        .map(|e| e.version)
}

/// A complete snapshot at `version` holding `entities`, in one page.
fn snapshot(s: &Subject, entities: Vec<Entity>, version: i64) {
    let total = entities.len() as i64;
    s.store
        .apply_snapshot_page(&page(entities, version, total, None), true)
        .expect("snapshot");
}

fn retry_later(id: JournalId, not_before: DateTime<Utc>) -> DeliveryOutcome {
    DeliveryOutcome::RetryLater {
        journal_id: id,
        failure: TransientFailure::CloudAnswered { blamed: false },
        failed_at: t0(),
        not_before,
        code: TerminalCode::STORAGE_FAILED,
        message: "insert failed".into(),
    }
}

fn synced(id: JournalId) -> DeliveryOutcome {
    DeliveryOutcome::Synced {
        journal_id: id,
        cloud_event_id: Some("0194b7a2-6c1e-7f00-8000-0000000000aa".into()),
        duplicate: false,
    }
}

/// A new store knows no catalog and holds no sale.
pub fn a_fresh_store_is_empty(s: Subject) {
    let pos = s.store.catalog_position().expect("position");
    assert_eq!(pos.catalog_version, None);
    assert!(!pos.snapshot_in_progress);
    assert!(manifest(&s).is_empty());
    let counts = s.store.outbox_counts().expect("counts");
    assert_eq!(
        (
            counts.pending,
            counts.in_flight,
            counts.failed,
            counts.synced,
            counts.needs_attention
        ),
        (0, 0, 0, 0, 0)
    );
    assert_eq!(counts.oldest_pending_at, None);
    assert!(s.store.claim_batch(10, t0()).expect("claim").is_empty());
    assert_eq!(s.store.next_due_at().expect("due"), None);
}

/// A snapshot spread over pages keeps its cursor and progress until its last page, which sets
/// the catalog version; a later fresh snapshot removes what it did not list.
pub fn a_snapshot_completes_on_its_last_page_and_replaces_the_catalog(s: Subject) {
    s.store
        .apply_snapshot_page(
            &page(
                vec![product("p1", 3, "a"), product("p2", 4, "b")],
                5,
                3,
                Some("c1"),
            ),
            true,
        )
        .expect("page 1");
    let pos = s.store.catalog_position().expect("position");
    assert!(pos.snapshot_in_progress);
    assert_eq!(pos.snapshot_cursor.as_deref(), Some("c1"));
    assert_eq!((pos.snapshot_received, pos.snapshot_total), (2, 3));
    assert_eq!(
        pos.catalog_version, None,
        "incomplete snapshots are no version"
    );

    s.store
        .apply_snapshot_page(&page(vec![product("p3", 5, "c")], 5, 3, None), false)
        .expect("page 2");
    let pos = s.store.catalog_position().expect("position");
    assert!(!pos.snapshot_in_progress);
    assert_eq!(pos.catalog_version, Some(5));
    assert_eq!(pos.snapshot_cursor, None);
    assert_eq!(keys(&manifest(&s)), [k("p1"), k("p2"), k("p3")]);

    snapshot(&s, vec![product("p1", 3, "a"), product("p3", 6, "c2")], 6);
    assert_eq!(keys(&manifest(&s)), [k("p1"), k("p3")]);
    assert_eq!(version_of(&s, "p3"), Some(6));
    assert_eq!(
        s.store
            .catalog_position()
            .expect("position")
            .catalog_version,
        Some(6)
    );
}

/// Deltas move versions forward only, tombstones delete, and the position follows the page.
pub fn deltas_never_put_an_older_version_over_a_newer_one(s: Subject) {
    snapshot(&s, vec![product("p1", 3, "a"), product("p2", 4, "b")], 5);
    let delta = |changes: Vec<Entity>, next_since: i64| DeltaPage {
        changes,
        next_since,
        has_more: false,
        catalog_version: next_since,
    };
    s.store
        .apply_delta_page(&delta(vec![product("p1", 2, "older")], 6))
        .expect("older");
    assert_eq!(version_of(&s, "p1"), Some(3));
    s.store
        .apply_delta_page(&delta(vec![product("p1", 7, "newer")], 7))
        .expect("newer");
    assert_eq!(version_of(&s, "p1"), Some(7));
    let mut gone = product("p2", 8, "b");
    gone.deleted = true;
    s.store
        .apply_delta_page(&delta(vec![gone], 8))
        .expect("tombstone");
    assert_eq!(keys(&manifest(&s)), [k("p1")]);
    assert_eq!(
        s.store
            .catalog_position()
            .expect("position")
            .catalog_version,
        Some(8)
    );
}

/// A 410 forgets the position (the next sync snapshots) but keeps the catalog usable.
pub fn require_resnapshot_forgets_the_position_and_keeps_the_catalog(s: Subject) {
    snapshot(&s, vec![product("p1", 3, "a")], 5);
    s.store.require_resnapshot().expect("resnapshot");
    let pos = s.store.catalog_position().expect("position");
    assert_eq!(pos.catalog_version, None);
    assert_eq!(pos.snapshot_cursor, None);
    assert!(!pos.snapshot_in_progress);
    assert_eq!(keys(&manifest(&s)), [k("p1")]);
}

/// The manifest pages in bytewise key order, strictly after the given key.
pub fn the_manifest_pages_in_key_order(s: Subject) {
    let ids = ["p5", "p1", "p4", "p2", "p3"];
    snapshot(&s, ids.iter().map(|id| product(id, 1, id)).collect(), 5);
    let first = s.store.manifest_after(None, 2).expect("first");
    assert_eq!(keys(&first), [k("p1"), k("p2")]);
    let next = s
        .store
        .manifest_after(Some(k("p2").as_str()), 2)
        .expect("next");
    assert_eq!(keys(&next), [k("p3"), k("p4")]);
    let last = s
        .store
        .manifest_after(Some(k("p4").as_str()), 2)
        .expect("last");
    assert_eq!(keys(&last), [k("p5")]);
    for e in first.iter().chain(&next).chain(&last) {
        assert_eq!(e.version, 1);
    }
}

/// The fingerprint tree is the protocol's tree of the live catalog, and a leaf's manifest
/// lists exactly its live entities.
pub fn fingerprints_are_the_protocols_tree_of_the_live_catalog(s: Subject) {
    let live: Vec<Entity> = (0..40)
        .map(|i| product(&format!("p{i:03}"), i + 1, "x"))
        .collect();
    snapshot(&s, live.clone(), 50);
    let mut gone = product("p000", 60, "x");
    gone.deleted = true;
    s.store
        .apply_delta_page(&DeltaPage {
            changes: vec![gone],
            next_since: 60,
            has_more: false,
            catalog_version: 60,
        })
        .expect("tombstone");

    let mut expected = FingerprintTree::default();
    for e in live.iter().skip(1) {
        expected.add(e.key().as_str(), e.version, &e.hash);
    }
    let tree = s.store.fingerprint_tree().expect("tree");
    assert_eq!(tree.count(), 39);
    assert_eq!(
        tree.fingerprint(NodeId::ROOT),
        expected.fingerprint(NodeId::ROOT)
    );

    let key = live[5].key();
    let in_leaf = s
        .store
        .manifest_in_leaves(&[leaf_of(key.as_str())])
        .expect("leaf");
    assert!(keys(&in_leaf).contains(&key.as_str().to_string()));
    assert!(in_leaf
        .iter()
        .all(|e| leaf_of(EntityKey::new(&e.entity_type, &e.id).as_str()) == leaf_of(key.as_str())));
    let dead = live[0].key();
    let in_dead_leaf = s
        .store
        .manifest_in_leaves(&[leaf_of(dead.as_str())])
        .expect("leaf");
    assert!(!keys(&in_dead_leaf).contains(&dead.as_str().to_string()));
}

/// A reconcile plan replaces what it covers, except rows a delta brought in after the plan's
/// version (they are newer than the plan knows).
pub fn a_reconcile_plan_keeps_rows_newer_than_the_plan(s: Subject) {
    snapshot(
        &s,
        vec![
            product("p1", 2, "stale"),
            product("p2", 3, "drifted"),
            product("p3", 4, "extra"),
        ],
        5,
    );
    // A delta lands while the reconcile runs: p2 moves to 9, the catalog to 10.
    s.store
        .apply_delta_page(&DeltaPage {
            changes: vec![product("p2", 9, "from a delta")],
            next_since: 10,
            has_more: false,
            catalog_version: 10,
        })
        .expect("delta");
    let plan = ReconcilePlan {
        upserts: vec![product("p1", 6, "fresh"), product("p2", 7, "plan's")],
        deletes: vec![EntityRef {
            entity_type: "product".into(),
            id: "p3".into(),
        }],
    };
    s.store
        .apply_reconcile_plan(&KeyRange::default(), &plan, 8)
        .expect("apply");
    assert_eq!(version_of(&s, "p1"), Some(6));
    assert_eq!(version_of(&s, "p2"), Some(9), "the delta's row is newer");
    assert_eq!(version_of(&s, "p3"), None);
}

/// Claims take due sales oldest first, up to the limit, and mark them in flight; a restart
/// releases them.
pub fn claims_take_the_oldest_sales_and_restart_releases_them(s: Subject) {
    let ids: Vec<JournalId> = (0..3).map(|_| (s.record_sale)()).collect();
    let counts = s.store.outbox_counts().expect("counts");
    assert_eq!(counts.pending, 3);
    assert!(counts.oldest_pending_at.is_some());

    let first = s.store.claim_batch(2, t0()).expect("claim");
    assert_eq!(
        first.iter().map(|i| i.journal_id).collect::<Vec<_>>(),
        ids[..2]
    );
    assert!(first[0].event.local_event_id < first[1].event.local_event_id);
    assert!(first.iter().all(|i| i.attempts == 0));
    let counts = s.store.outbox_counts().expect("counts");
    assert_eq!((counts.pending, counts.in_flight), (1, 2));
    assert_eq!(s.store.claim_batch(10, t0()).expect("rest").len(), 1);
    assert!(s.store.claim_batch(10, t0()).expect("none").is_empty());

    assert_eq!(s.store.release_in_flight().expect("release"), 3);
    let counts = s.store.outbox_counts().expect("counts");
    assert_eq!((counts.pending, counts.in_flight), (3, 0));
}

/// A transient failure waits for its time, counts the attempt and keeps its history.
pub fn a_failed_sale_waits_for_its_retry_time(s: Subject) {
    let id = (s.record_sale)();
    s.store.claim_batch(1, t0()).expect("claim");
    let due = t0() + Duration::seconds(60);
    s.store
        .record_outcomes(&[retry_later(id, due)])
        .expect("record");
    let counts = s.store.outbox_counts().expect("counts");
    assert_eq!((counts.failed, counts.in_flight), (1, 0));
    assert!(
        counts.oldest_pending_at.is_some(),
        "a failed sale is still waiting"
    );
    assert_eq!(s.store.next_due_at().expect("due"), Some(due));
    assert!(s.store.claim_batch(10, t0()).expect("early").is_empty());

    let again = s
        .store
        .claim_batch(10, due + Duration::seconds(1))
        .expect("due");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].journal_id, id);
    assert_eq!(again[0].attempts, 1);
    assert_eq!(again[0].history.answered_failures, 1);
    assert_eq!(again[0].history.sale_failures, 0);
    assert_eq!(again[0].history.last_failed_at, Some(t0()));
}

/// A retry time further ahead than any backoff sets (more than `backoff::MAX_DELAY`) was
/// stamped before the wall clock was stepped back: the sale is due now, not in as many hours
/// as the step. One within that bound still waits.
pub fn a_retry_time_left_ahead_by_a_clock_stepped_back_is_due_now(s: Subject) {
    let (near, far) = ((s.record_sale)(), (s.record_sale)());
    s.store.claim_batch(2, t0()).expect("claim");
    let max = Duration::from_std(crate::backoff::MAX_DELAY).unwrap_or(Duration::hours(1));
    s.store
        .record_outcomes(&[
            retry_later(near, t0() + max),
            retry_later(far, t0() + max + Duration::hours(3)),
        ])
        .expect("record");
    // The wall clock now reads t0 (stepped back by 3 h from when `far` was stamped).
    let claimed = s.store.claim_batch(10, t0()).expect("claim");
    assert_eq!(
        claimed.iter().map(|i| i.journal_id).collect::<Vec<_>>(),
        vec![far],
        "only the retry time no backoff could have set is due"
    );
    assert!(s
        .store
        .claim_batch(10, t0() + max - Duration::seconds(1))
        .expect("claim")
        .is_empty());
    assert_eq!(
        s.store.claim_batch(10, t0() + max).expect("claim").len(),
        1,
        "the other waits for its time as before"
    );
}

/// Synced is final: a late outcome for a synced sale changes nothing, and nothing claims it.
pub fn synced_is_final(s: Subject) {
    let id = (s.record_sale)();
    s.store.claim_batch(1, t0()).expect("claim");
    s.store.record_outcomes(&[synced(id)]).expect("synced");
    s.store
        .record_outcomes(&[retry_later(id, t0())])
        .expect("a repeated outcome is not an error");
    let counts = s.store.outbox_counts().expect("counts");
    assert_eq!((counts.synced, counts.failed, counts.pending), (1, 0, 0));
    assert_eq!(counts.oldest_pending_at, None);
    assert!(s
        .store
        .claim_batch(10, t0() + Duration::days(1))
        .expect("claim")
        .is_empty());
    assert_eq!(s.store.next_due_at().expect("due"), None);
}

/// A sale that needs an operator is neither claimed nor due, and other sales go on.
pub fn a_sale_needing_attention_does_not_block_the_others(s: Subject) {
    let parked = (s.record_sale)();
    let next = (s.record_sale)();
    s.store.claim_batch(1, t0()).expect("claim");
    s.store
        .record_outcomes(&[DeliveryOutcome::NeedsAttention {
            journal_id: parked,
            code: TerminalCode::Api(possync_protocol::ErrorCode::PosSyncEventInvalid),
            message: "total does not match lines".into(),
        }])
        .expect("record");
    let counts = s.store.outbox_counts().expect("counts");
    assert_eq!((counts.needs_attention, counts.pending), (1, 1));
    let claimed = s
        .store
        .claim_batch(10, t0() + Duration::days(1))
        .expect("claim");
    assert_eq!(
        claimed.iter().map(|i| i.journal_id).collect::<Vec<_>>(),
        [next]
    );
    assert_eq!(s.store.next_due_at().expect("due"), None);
}

/// Expands into one `#[test]` per case of the [`LocalStore`] contract, each on a fresh
/// subject from `$make: fn() -> Subject`.
#[macro_export]
macro_rules! local_store_contract {
    ($make:path) => {
        $crate::local_store_contract!(@cases $make;
            a_fresh_store_is_empty,
            a_snapshot_completes_on_its_last_page_and_replaces_the_catalog,
            deltas_never_put_an_older_version_over_a_newer_one,
            require_resnapshot_forgets_the_position_and_keeps_the_catalog,
            the_manifest_pages_in_key_order,
            fingerprints_are_the_protocols_tree_of_the_live_catalog,
            a_reconcile_plan_keeps_rows_newer_than_the_plan,
            claims_take_the_oldest_sales_and_restart_releases_them,
            a_failed_sale_waits_for_its_retry_time,
            a_retry_time_left_ahead_by_a_clock_stepped_back_is_due_now,
            synced_is_final,
            a_sale_needing_attention_does_not_block_the_others,
        );
    };
    (@cases $make:path; $($case:ident),+ $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::store_contract::$case($make());
            }
        )+
    };
}
