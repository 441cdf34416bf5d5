//! Test support shared by this crate's tests and the simulations: an in-memory [`LocalStore`]
//! with the contract's semantics, a scriptable in-memory [`CloudApi`] with the cloud's
//! idempotency and paging rules, and a clock tests move by hand.
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

// ------------------------------------------------------------------------------------------
// Clock
// ------------------------------------------------------------------------------------------

/// A clock that only moves when told to.
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    /// Starts at `at`.
    pub fn new(at: DateTime<Utc>) -> Self {
        ManualClock(Mutex::new(at))
    }

    /// Moves time forward.
    pub fn advance(&self, by: Duration) {
        let mut t = lock(&self.0);
        *t += chrono::Duration::from_std(by).unwrap_or(chrono::Duration::zero());
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new(
            Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0)
                .single()
                .unwrap_or_default(),
        )
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *lock(&self.0)
    }
}

// ------------------------------------------------------------------------------------------
// Store
// ------------------------------------------------------------------------------------------

/// The store operations faults can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // one variant per LocalStore method, named like it
pub enum StoreOp {
    CatalogPosition,
    ApplySnapshotPage,
    ApplyDeltaPage,
    RequireResnapshot,
    ManifestAfter,
    ApplyReconcilePlan,
    ReleaseInFlight,
    ClaimBatch,
    RecordOutcomes,
    NextDueAt,
    OutboxCounts,
}

/// How an injected store fault shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFault {
    /// The call returns `StoreError::Database`.
    Error,
    /// The call panics (as a buggy store might).
    Panic,
}

/// One `sync_journal` row of the in-memory store.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)] // the columns of `sync_journal`, see docs/local-schema.md
pub struct MemJournalRow {
    pub journal_id: JournalId,
    pub event: SaleEvent,
    /// `pending`, `in_flight`, `failed`, `synced`, `needs_attention`.
    pub status: &'static str,
    pub attempts: u32,
    pub history: FailureHistory,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_error_code: Option<TerminalCode>,
    pub last_error_message: Option<String>,
    pub cloud_event_id: Option<String>,
}

#[derive(Default)]
struct MemInner {
    entities: BTreeMap<String, Entity>,
    position: CatalogPosition,
    snapshot_seen: BTreeSet<String>,
    journal: BTreeMap<JournalId, MemJournalRow>,
    next_journal_id: JournalId,
    faults: HashMap<StoreOp, VecDeque<Option<StoreFault>>>,
    outcomes: Vec<DeliveryOutcome>,
    synced_rewrites: usize,
}

/// An in-memory [`LocalStore`] with the contract's semantics (version-guarded upserts,
/// resumable snapshot, journal state machine), plus fault injection and inspection helpers.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<MemInner>,
}

impl MemoryStore {
    /// An empty store: no catalog, empty journal.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// The next `times` calls of `op` fail with `fault`.
    pub fn fail_next(&self, op: StoreOp, times: usize, fault: StoreFault) {
        let mut g = lock(&self.inner);
        let q = g.faults.entry(op).or_default();
        for _ in 0..times {
            q.push_back(Some(fault));
        }
    }

    /// The `nth` call of `op` from now (1-based) fails with `fault`; the calls before it pass.
    pub fn fail_call(&self, op: StoreOp, nth: usize, fault: StoreFault) {
        let mut g = lock(&self.inner);
        let q = g.faults.entry(op).or_default();
        for _ in 1..nth {
            q.push_back(None);
        }
        q.push_back(Some(fault));
    }

    fn check(&self, op: StoreOp) -> Result<MutexGuard<'_, MemInner>, StoreError> {
        let mut g = lock(&self.inner);
        match g
            .faults
            .get_mut(&op)
            .and_then(VecDeque::pop_front)
            .flatten()
        {
            None => Ok(g),
            Some(StoreFault::Error) => {
                Err(StoreError::Database(format!("injected {op:?} failure")))
            }
            Some(StoreFault::Panic) => {
                drop(g);
                panic!("injected {op:?} panic");
            }
        }
    }

    /// Adds a sale to the journal as `pending`, chained as the real store chains it
    /// (`possync_protocol::journal_chain`) unless it already carries a `chain_hash`; returns
    /// its journal id.
    pub fn enqueue(&self, mut event: SaleEvent) -> JournalId {
        let mut g = lock(&self.inner);
        if event.chain_hash.is_none() {
            let predecessor = g
                .journal
                .values()
                .find(|r| {
                    r.event.pos_id == event.pos_id
                        && r.event.local_event_id == event.local_event_id - 1
                })
                .and_then(|r| r.event.chain_hash.clone());
            let prev = possync_protocol::journal_chain::prev_of(
                event.pos_id,
                event.local_event_id,
                predecessor.as_deref(),
            );
            event.chain_hash = event.expected_chain_hash(&prev).ok();
        }
        g.next_journal_id += 1;
        let id = g.next_journal_id;
        g.journal.insert(
            id,
            MemJournalRow {
                journal_id: id,
                event,
                status: "pending",
                attempts: 0,
                history: FailureHistory::default(),
                next_attempt_at: None,
                last_error_code: None,
                last_error_message: None,
                cloud_event_id: None,
            },
        );
        id
    }

    /// Every journal row, by journal id.
    pub fn journal(&self) -> Vec<MemJournalRow> {
        lock(&self.inner).journal.values().cloned().collect()
    }

    /// Journal rows in `status`.
    pub fn journal_in(&self, status: &str) -> Vec<MemJournalRow> {
        self.journal()
            .into_iter()
            .filter(|r| r.status == status)
            .collect()
    }

    /// Operator retry: `needs_attention` rows back to `pending` with attempts reset.
    pub fn retry_all_needing_attention(&self) -> usize {
        let mut g = lock(&self.inner);
        let mut n = 0;
        for r in g
            .journal
            .values_mut()
            .filter(|r| r.status == "needs_attention")
        {
            r.status = "pending";
            r.attempts = 0;
            r.history = FailureHistory::default();
            r.next_attempt_at = None;
            n += 1;
        }
        n
    }

    /// Every outcome ever recorded, in order.
    pub fn outcomes(&self) -> Vec<DeliveryOutcome> {
        lock(&self.inner).outcomes.clone()
    }

    /// Attempts to change a row already `synced` (the SQLite trigger would refuse them).
    pub fn synced_rewrites(&self) -> usize {
        lock(&self.inner).synced_rewrites
    }

    /// The catalog position, read without consuming injected faults (for assertions).
    pub fn position(&self) -> CatalogPosition {
        lock(&self.inner).position.clone()
    }

    /// The local catalog, by key.
    pub fn entities(&self) -> BTreeMap<String, Entity> {
        lock(&self.inner).entities.clone()
    }

    /// Local tampering for reconcile tests: put or remove an entity behind sync's back.
    pub fn tamper_put(&self, e: Entity) {
        lock(&self.inner).entities.insert(e.key().to_string(), e);
    }

    /// See [`MemoryStore::tamper_put`].
    pub fn tamper_remove(&self, key: &str) {
        lock(&self.inner).entities.remove(key);
    }

    fn upsert_guarded(entities: &mut BTreeMap<String, Entity>, e: &Entity) {
        let key = e.key().to_string();
        let older = entities
            .get(&key)
            .is_some_and(|cur| cur.version > e.version);
        if older {
            return;
        }
        if e.deleted {
            entities.remove(&key);
        } else {
            entities.insert(key, e.clone());
        }
    }
}

impl LocalStore for MemoryStore {
    fn catalog_position(&self) -> Result<CatalogPosition, StoreError> {
        Ok(self.check(StoreOp::CatalogPosition)?.position.clone())
    }

    fn apply_snapshot_page(
        &self,
        page: &SnapshotPage,
        started_fresh: bool,
    ) -> Result<(), StoreError> {
        let mut g = self.check(StoreOp::ApplySnapshotPage)?;
        let g = &mut *g;
        if started_fresh {
            g.snapshot_seen.clear();
            g.position.snapshot_in_progress = true;
            g.position.snapshot_version = Some(page.snapshot_version);
            g.position.snapshot_total = page.total;
            g.position.snapshot_received = 0;
        }
        for e in &page.entities {
            Self::upsert_guarded(&mut g.entities, e);
            g.snapshot_seen.insert(e.key().to_string());
        }
        g.position.snapshot_received += page.entities.len() as i64;
        g.position.snapshot_cursor = page.next_cursor.clone();
        if page.next_cursor.is_none() {
            let seen = std::mem::take(&mut g.snapshot_seen);
            g.entities.retain(|k, _| seen.contains(k));
            g.position.snapshot_in_progress = false;
            g.position.catalog_version =
                g.position.snapshot_version.or(Some(page.snapshot_version));
            g.position.last_synced_at = Some(Utc::now());
        }
        Ok(())
    }

    fn apply_delta_page(&self, page: &DeltaPage) -> Result<(), StoreError> {
        let mut g = self.check(StoreOp::ApplyDeltaPage)?;
        for e in &page.changes {
            Self::upsert_guarded(&mut g.entities, e);
        }
        g.position.catalog_version = Some(page.next_since);
        if !page.changes.is_empty() {
            g.position.last_synced_at = Some(Utc::now());
        }
        Ok(())
    }

    fn require_resnapshot(&self) -> Result<(), StoreError> {
        let mut g = self.check(StoreOp::RequireResnapshot)?;
        g.position.catalog_version = None;
        g.position.snapshot_cursor = None;
        g.position.snapshot_in_progress = false;
        g.position.snapshot_version = None;
        Ok(())
    }

    fn manifest_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ManifestEntry>, StoreError> {
        let g = self.check(StoreOp::ManifestAfter)?;
        Ok(g.entities
            .iter()
            .filter(|(k, _)| after.is_none_or(|a| k.as_bytes() > a.as_bytes()))
            .take(limit)
            .map(|(_, e)| ManifestEntry {
                entity_type: e.entity_type.clone(),
                id: e.id.clone(),
                version: e.version,
                hash: e.hash.clone(),
            })
            .collect())
    }

    fn fingerprint_tree(&self) -> Result<FingerprintTree, StoreError> {
        let g = self.check(StoreOp::ManifestAfter)?;
        Ok(live_tree(&g.entities))
    }

    fn manifest_in_leaves(&self, leaves: &[u32]) -> Result<Vec<ManifestEntry>, StoreError> {
        let g = self.check(StoreOp::ManifestAfter)?;
        Ok(g.entities
            .iter()
            .filter(|(k, e)| !e.deleted && leaves.contains(&leaf_of(k)))
            .map(|(_, e)| ManifestEntry {
                entity_type: e.entity_type.clone(),
                id: e.id.clone(),
                version: e.version,
                hash: e.hash.clone(),
            })
            .collect())
    }

    fn apply_reconcile_plan(
        &self,
        range: &KeyRange,
        plan: &ReconcilePlan,
        cloud_version: i64,
    ) -> Result<(), StoreError> {
        let mut g = self.check(StoreOp::ApplyReconcilePlan)?;
        // The port's rule: a row between the plan's version and the local catalog version came
        // by a delta while reconcile ran and is kept; any other row is the plan's to replace.
        let local_catalog_version = g.position.catalog_version.unwrap_or(i64::MAX);
        let replaceable =
            |l: &Entity| l.version <= cloud_version || l.version > local_catalog_version;
        for e in &plan.upserts {
            let key = e.key().to_string();
            if !range.contains(&key) {
                return Err(StoreError::Corrupt(format!(
                    "plan upsert {key} outside its range"
                )));
            }
            if g.entities.get(&key).is_none_or(replaceable) {
                g.entities.insert(key, e.clone());
            }
        }
        for d in &plan.deletes {
            let key = EntityKey::new(&d.entity_type, &d.id);
            if g.entities.get(key.as_str()).is_some_and(replaceable) {
                g.entities.remove(key.as_str());
            }
        }
        Ok(())
    }

    fn release_in_flight(&self) -> Result<usize, StoreError> {
        let mut g = self.check(StoreOp::ReleaseInFlight)?;
        let mut n = 0;
        for r in g.journal.values_mut().filter(|r| r.status == "in_flight") {
            r.status = "pending";
            n += 1;
        }
        Ok(n)
    }

    fn claim_batch(&self, limit: usize, now: DateTime<Utc>) -> Result<Vec<OutboxItem>, StoreError> {
        let mut g = self.check(StoreOp::ClaimBatch)?;
        let mut due: Vec<&mut MemJournalRow> = g
            .journal
            .values_mut()
            .filter(|r| {
                r.status == "pending"
                    || (r.status == "failed" && r.next_attempt_at.is_none_or(|t| t <= now))
            })
            .collect();
        due.sort_by_key(|r| r.event.local_event_id);
        Ok(due
            .into_iter()
            .take(limit)
            .map(|r| {
                r.status = "in_flight";
                OutboxItem {
                    journal_id: r.journal_id,
                    event: r.event.clone(),
                    attempts: r.attempts,
                    history: r.history,
                }
            })
            .collect())
    }

    fn record_outcomes(&self, outcomes: &[DeliveryOutcome]) -> Result<(), StoreError> {
        let mut g = self.check(StoreOp::RecordOutcomes)?;
        let g = &mut *g;
        for o in outcomes {
            let id = match o {
                DeliveryOutcome::Synced { journal_id, .. }
                | DeliveryOutcome::NeedsAttention { journal_id, .. }
                | DeliveryOutcome::RetryLater { journal_id, .. } => *journal_id,
            };
            let Some(r) = g.journal.get_mut(&id) else {
                return Err(StoreError::Corrupt(format!("no journal row {id}")));
            };
            if r.status == "synced" {
                g.synced_rewrites += 1;
                continue;
            }
            r.attempts += 1;
            match o {
                DeliveryOutcome::Synced { cloud_event_id, .. } => {
                    r.status = "synced";
                    r.cloud_event_id = cloud_event_id.clone();
                    r.next_attempt_at = None;
                }
                DeliveryOutcome::NeedsAttention { code, message, .. } => {
                    r.status = "needs_attention";
                    r.last_error_code = Some(*code);
                    r.last_error_message = Some(message.clone());
                    r.next_attempt_at = None;
                }
                DeliveryOutcome::RetryLater {
                    not_before,
                    failure,
                    failed_at,
                    code,
                    message,
                    ..
                } => {
                    r.status = "failed";
                    r.history = r.history.after(*failure, *failed_at);
                    r.next_attempt_at = Some(*not_before);
                    r.last_error_code = Some(*code);
                    r.last_error_message = Some(message.clone());
                }
            }
        }
        g.outcomes.extend_from_slice(outcomes);
        Ok(())
    }

    fn next_due_at(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let g = self.check(StoreOp::NextDueAt)?;
        Ok(g.journal
            .values()
            .filter(|r| r.status == "failed")
            .filter_map(|r| r.next_attempt_at)
            .min())
    }

    fn outbox_counts(&self) -> Result<OutboxCounts, StoreError> {
        let g = self.check(StoreOp::OutboxCounts)?;
        let mut c = OutboxCounts::default();
        for r in g.journal.values() {
            match r.status {
                "pending" => c.pending += 1,
                "in_flight" => c.in_flight += 1,
                "failed" => c.failed += 1,
                "synced" => c.synced += 1,
                _ => c.needs_attention += 1,
            }
            if matches!(r.status, "pending" | "in_flight" | "failed") {
                let at = r.event.occurred_at;
                c.oldest_pending_at = Some(c.oldest_pending_at.map_or(at, |o| o.min(at)));
            }
        }
        Ok(c)
    }
}

// ------------------------------------------------------------------------------------------
// Cloud
// ------------------------------------------------------------------------------------------

/// The cloud endpoints faults can be scripted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // one variant per CloudApi method, named like it
pub enum Endpoint {
    Snapshot,
    Delta,
    Reconcile,
    PostEvents,
    Probe,
    Fingerprints,
    ReconcileLeaves,
}

/// A scripted misbehaviour of one call.
#[derive(Debug, Clone, PartialEq)]
pub enum CloudFault {
    /// The call fails with this error (nothing happens on the cloud).
    Fail(CloudError),
    /// `post_events` stores the events but answers with one result too few.
    DropLastResult,
    /// `post_events` stores the events but the answer is lost (network cut after commit).
    LoseAnswer,
}

#[derive(Default)]
struct CloudInner {
    /// Latest state of every key, tombstones included (so deltas can report deletions).
    entities: BTreeMap<String, Entity>,
    version: i64,
    /// Deltas from a `since` below this answer 410.
    horizon: i64,
    faults: HashMap<Endpoint, VecDeque<CloudFault>>,
    calls: HashMap<Endpoint, usize>,
    snapshot_cursors: Vec<Option<String>>,
    reconcile_requests: Vec<(ReconcileMode, KeyRange, usize)>,
    ledger: HashMap<(Uuid, Uuid, i64), (String, Uuid)>,
    stored_events: usize,
    in_flight_posts: usize,
    max_in_flight_posts: usize,
    post_batch_sizes: Vec<usize>,
    /// Local event ids whose presence fails the whole request with a storage error, like a
    /// cloud whose group commit cannot store one event.
    poisoned: BTreeSet<i64>,
    /// Reconcile-family requests and JSON body sizes.
    traffic: Traffic,
}

/// An in-memory cloud: catalog with versions and tombstones, snapshot/delta paging, reconcile,
/// and an idempotent sales ledger — plus scripted faults and call accounting.
pub struct FakeCloud {
    inner: Mutex<CloudInner>,
    offline: AtomicBool,
    /// Answers the fingerprint routes with 404.
    old_cloud: AtomicBool,
    /// Manifest entry limit of reconcile (413 above it).
    pub max_manifest_entries: usize,
    /// How long `post_events` holds the call open, so concurrent calls overlap observably.
    pub post_delay: Duration,
    /// While closed, `post_events` calls wait (already counted as in flight).
    gate: tokio::sync::watch::Sender<bool>,
}

impl Default for FakeCloud {
    fn default() -> Self {
        FakeCloud {
            inner: Mutex::new(CloudInner::default()),
            offline: AtomicBool::new(false),
            old_cloud: AtomicBool::new(false),
            max_manifest_entries: possync_protocol::DEFAULT_MANIFEST_MAX_ENTRIES,
            post_delay: Duration::ZERO,
            gate: tokio::sync::watch::Sender::new(true),
        }
    }
}

/// Decrements the in-flight counter even if the calling future is dropped mid-call.
struct InFlight<'a>(&'a Mutex<CloudInner>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        lock(self.0).in_flight_posts -= 1;
    }
}

impl FakeCloud {
    /// An empty catalog at version 0 and an empty ledger.
    pub fn new() -> Self {
        FakeCloud::default()
    }

    /// Holds every `post_events` call open for `d`, so concurrent calls overlap.
    pub fn with_post_delay(mut self, d: Duration) -> Self {
        self.post_delay = d;
        self
    }

    /// Holds every `post_events` call open until [`FakeCloud::open_gate`], so a test can see
    /// how many calls the engine opens at once without depending on timing.
    pub fn close_gate(&self) {
        self.gate.send_replace(false);
    }

    /// Lets held and future `post_events` calls proceed.
    pub fn open_gate(&self) {
        self.gate.send_replace(true);
    }

    /// `post_events` calls open right now.
    pub fn concurrent_posts(&self) -> usize {
        lock(&self.inner).in_flight_posts
    }

    /// Answers 413 to reconcile manifests above `n` entries.
    pub fn with_max_manifest_entries(mut self, n: usize) -> Self {
        self.max_manifest_entries = n;
        self
    }

    /// Upserts `n` products `p00001..` at fresh versions.
    pub fn seed_products(&self, n: usize) {
        for i in 1..=n {
            self.upsert(
                "product",
                &format!("p{i:05}"),
                serde_json::json!({"name": format!("Product {i}"), "sku": format!("SKU{i}")}),
            );
        }
    }

    /// Creates or changes an entity at the next version; returns that version.
    pub fn upsert(&self, entity_type: &str, id: &str, data: serde_json::Value) -> i64 {
        let mut g = lock(&self.inner);
        g.version += 1;
        let e = entity(entity_type, id, g.version, data);
        g.entities.insert(e.key().to_string(), e);
        g.version
    }

    /// Deletes an entity (a tombstone at the next version).
    pub fn delete(&self, entity_type: &str, id: &str) -> i64 {
        let mut g = lock(&self.inner);
        g.version += 1;
        let mut e = entity(entity_type, id, g.version, serde_json::Value::Null);
        e.deleted = true;
        g.entities.insert(e.key().to_string(), e);
        g.version
    }

    /// Forgets history before `since`: deltas from older positions answer 410.
    pub fn set_horizon(&self, since: i64) {
        lock(&self.inner).horizon = since;
    }

    /// The cloud's current catalog version.
    pub fn version(&self) -> i64 {
        lock(&self.inner).version
    }

    /// The cloud's live (non-deleted) entities, by key.
    pub fn live_entities(&self) -> BTreeMap<String, Entity> {
        lock(&self.inner)
            .entities
            .iter()
            .filter(|(_, e)| !e.deleted)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }

    /// Scripts the next call of `endpoint` to misbehave (faults queue up in order).
    pub fn fault_next(&self, endpoint: Endpoint, fault: CloudFault) {
        lock(&self.inner)
            .faults
            .entry(endpoint)
            .or_default()
            .push_back(fault);
    }

    /// A request carrying sale `local_event_id` fails whole with 503
    /// `POS_SYNC_STORAGE_FAILED` (while others are stored), until [`FakeCloud::cure`].
    pub fn poison(&self, local_event_id: i64) {
        lock(&self.inner).poisoned.insert(local_event_id);
    }

    /// Undoes [`FakeCloud::poison`].
    pub fn cure(&self, local_event_id: i64) {
        lock(&self.inner).poisoned.remove(&local_event_id);
    }

    /// Every call fails as unreachable while set.
    pub fn set_offline(&self, offline: bool) {
        self.offline.store(offline, Ordering::SeqCst);
    }

    /// Calls made to `endpoint` (including failed ones).
    pub fn calls(&self, endpoint: Endpoint) -> usize {
        lock(&self.inner).calls.get(&endpoint).copied().unwrap_or(0)
    }

    /// The cursor of every snapshot request, in order.
    pub fn snapshot_cursors(&self) -> Vec<Option<String>> {
        lock(&self.inner).snapshot_cursors.clone()
    }

    /// `(mode, range, entries)` of every reconcile request, in order.
    pub fn reconcile_requests(&self) -> Vec<(ReconcileMode, KeyRange, usize)> {
        lock(&self.inner).reconcile_requests.clone()
    }

    /// Distinct sales stored in the ledger.
    pub fn stored_events(&self) -> usize {
        lock(&self.inner).stored_events
    }

    /// Most `post_events` calls ever open at the same time.
    pub fn max_concurrent_posts(&self) -> usize {
        lock(&self.inner).max_in_flight_posts
    }

    /// Events per `post_events` call, in order.
    pub fn post_batch_sizes(&self) -> Vec<usize> {
        lock(&self.inner).post_batch_sizes.clone()
    }

    fn begin(&self, endpoint: Endpoint) -> Result<Option<CloudFault>, CloudError> {
        let mut g = lock(&self.inner);
        *g.calls.entry(endpoint).or_default() += 1;
        if self.offline.load(Ordering::SeqCst) {
            return Err(CloudError::Unreachable(
                "connection refused (offline)".into(),
            ));
        }
        match g.faults.get_mut(&endpoint).and_then(VecDeque::pop_front) {
            Some(CloudFault::Fail(e)) => Err(e),
            other => Ok(other),
        }
    }

    /// Answers the fingerprint routes with 404, like a cloud from before them.
    pub fn act_as_old_cloud(&self, old: bool) {
        self.old_cloud.store(old, Ordering::SeqCst);
    }

    fn not_found() -> CloudError {
        CloudError::Rejected {
            status: 404,
            code: None,
            message: "not found".into(),
            retry_after: None,
            reason: None,
        }
    }

    fn count_traffic<T: serde::Serialize>(&self, req: &T) {
        let n = serde_json::to_vec(req).map_or(0, |v| v.len() as u64);
        let mut g = lock(&self.inner);
        g.traffic.requests += 1;
        g.traffic.bytes_sent += n;
    }

    fn count_answer<T: serde::Serialize>(&self, resp: &T) {
        let n = serde_json::to_vec(resp).map_or(0, |v| v.len() as u64);
        lock(&self.inner).traffic.bytes_received += n;
    }

    /// The cloud's side of a reconcile: `truth` (live entities in scope) against `entries`.
    fn compare(
        truth: &BTreeMap<&String, &Entity>,
        entries: &[ManifestEntry],
        mode: ReconcileMode,
        version: i64,
        range: KeyRange,
    ) -> ReconcileResponse {
        let mut summary = ReconcileSummary {
            checked: entries.len() as i64,
            ..ReconcileSummary::default()
        };
        let mut plan = ReconcilePlan::default();
        let mut held = BTreeSet::new();
        for m in entries {
            let key = EntityKey::new(&m.entity_type, &m.id).to_string();
            held.insert(key.clone());
            match truth.get(&key) {
                Some(e) if e.hash == m.hash && e.version == m.version => summary.unchanged += 1,
                Some(e) => plan.upserts.push((*e).clone()),
                None => plan.deletes.push(EntityRef {
                    entity_type: m.entity_type.clone(),
                    id: m.id.clone(),
                }),
            }
        }
        for (k, e) in truth {
            if !held.contains(*k) {
                plan.upserts.push((*e).clone());
            }
        }
        summary.upserts = plan.upserts.len() as i64;
        summary.deletes = plan.deletes.len() as i64;
        if mode == ReconcileMode::Verify {
            plan = ReconcilePlan::default();
        }
        ReconcileResponse {
            catalog_version: version,
            range,
            summary,
            plan,
        }
    }

    fn rejected(status: u16, code: ErrorCode, message: &str, reason: Option<&str>) -> CloudError {
        CloudError::Rejected {
            status,
            code: Some(code),
            message: message.into(),
            retry_after: None,
            reason: reason.map(str::to_string),
        }
    }
}

#[async_trait]
impl CloudApi for FakeCloud {
    async fn probe(&self) -> Result<(), CloudError> {
        self.begin(Endpoint::Probe).map(|_| ())
    }

    async fn snapshot(&self, cursor: Option<&str>, limit: u32) -> Result<SnapshotPage, CloudError> {
        lock(&self.inner)
            .snapshot_cursors
            .push(cursor.map(str::to_string));
        self.begin(Endpoint::Snapshot)?;
        let g = lock(&self.inner);
        // cursor = "<snapshot_version>|<last key>"
        let (snapshot_version, after) = match cursor {
            None => (g.version, None),
            Some(c) => {
                let (v, k) = c.split_once('|').ok_or_else(|| {
                    Self::rejected(400, ErrorCode::PosCatalogSnapshotFailed, "bad cursor", None)
                })?;
                let v: i64 = v.parse().map_err(|_| {
                    Self::rejected(400, ErrorCode::PosCatalogSnapshotFailed, "bad cursor", None)
                })?;
                (v, Some(k.to_string()))
            }
        };
        let live = g.entities.iter().filter(|(_, e)| !e.deleted);
        let total = live.clone().count() as i64;
        let mut page: Vec<Entity> = live
            .filter(|(k, _)| after.as_ref().is_none_or(|a| k.as_bytes() > a.as_bytes()))
            .take(limit as usize + 1)
            .map(|(_, e)| e.clone())
            .collect();
        let more = page.len() > limit as usize;
        page.truncate(limit as usize);
        let next_cursor = if more {
            page.last()
                .map(|e| format!("{snapshot_version}|{}", e.key()))
        } else {
            None
        };
        Ok(SnapshotPage {
            snapshot_version,
            total,
            entities: page,
            next_cursor,
        })
    }

    async fn delta(&self, since: i64, limit: u32) -> Result<DeltaPage, CloudError> {
        self.begin(Endpoint::Delta)?;
        let g = lock(&self.inner);
        if since < g.horizon {
            return Err(Self::rejected(
                410,
                ErrorCode::PosCatalogDeltaFailed,
                "history no longer retained",
                Some("resnapshot_required"),
            ));
        }
        let mut changes: Vec<Entity> = g
            .entities
            .values()
            .filter(|e| e.version > since)
            .cloned()
            .collect();
        changes.sort_by_key(|e| e.version);
        let has_more = changes.len() > limit as usize;
        changes.truncate(limit as usize);
        let next_since = changes.last().map_or(since, |e| e.version);
        Ok(DeltaPage {
            changes,
            next_since,
            has_more,
            catalog_version: g.version,
        })
    }

    fn reconcile_traffic(&self) -> Traffic {
        lock(&self.inner).traffic
    }

    async fn fingerprints(
        &self,
        req: &FingerprintRequest,
    ) -> Result<FingerprintResponse, CloudError> {
        self.count_traffic(req);
        self.begin(Endpoint::Fingerprints)?;
        if self.old_cloud.load(Ordering::SeqCst) {
            return Err(Self::not_found());
        }
        let g = lock(&self.inner);
        let tree = live_tree(&g.entities);
        let resp = FingerprintResponse {
            catalog_version: g.version,
            nodes: req.nodes.iter().map(|n| tree.fingerprint(*n)).collect(),
        };
        drop(g);
        self.count_answer(&resp);
        Ok(resp)
    }

    async fn reconcile_leaves(
        &self,
        req: &LeafReconcileRequest,
    ) -> Result<ReconcileResponse, CloudError> {
        self.count_traffic(req);
        self.begin(Endpoint::ReconcileLeaves)?;
        if self.old_cloud.load(Ordering::SeqCst) {
            return Err(Self::not_found());
        }
        let g = lock(&self.inner);
        let truth: BTreeMap<&String, &Entity> = g
            .entities
            .iter()
            .filter(|(k, e)| !e.deleted && req.leaves.contains(&leaf_of(k)))
            .collect();
        let resp = Self::compare(
            &truth,
            &req.entries,
            req.mode,
            g.version,
            KeyRange::default(),
        );
        drop(g);
        self.count_answer(&resp);
        Ok(resp)
    }

    async fn reconcile(&self, req: &ReconcileRequest) -> Result<ReconcileResponse, CloudError> {
        self.count_traffic(req);
        lock(&self.inner)
            .reconcile_requests
            .push((req.mode, req.range.clone(), req.entries.len()));
        self.begin(Endpoint::Reconcile)?;
        if req.entries.len() > self.max_manifest_entries {
            return Err(Self::rejected(
                413,
                ErrorCode::PosCatalogManifestTooLarge,
                &format!("at most {} entries", self.max_manifest_entries),
                None,
            ));
        }
        let g = lock(&self.inner);
        let truth: BTreeMap<&String, &Entity> = g
            .entities
            .iter()
            .filter(|(k, e)| !e.deleted && req.range.contains(k))
            .collect();
        let resp = Self::compare(&truth, &req.entries, req.mode, g.version, req.range.clone());
        drop(g);
        self.count_answer(&resp);
        Ok(resp)
    }

    async fn post_events(
        &self,
        events: &[SaleEvent],
        _sync_attempt: u32,
    ) -> Result<SalesEventsResponse, CloudError> {
        {
            let mut g = lock(&self.inner);
            g.in_flight_posts += 1;
            g.max_in_flight_posts = g.max_in_flight_posts.max(g.in_flight_posts);
            g.post_batch_sizes.push(events.len());
        }
        let _guard = InFlight(&self.inner);
        let mut gate = self.gate.subscribe();
        // The sender lives as long as `self`, so waiting cannot fail.
        let _ = gate.wait_for(|open| *open).await;
        if !self.post_delay.is_zero() {
            tokio::time::sleep(self.post_delay).await;
        }
        let fault = self.begin(Endpoint::PostEvents)?;
        let mut g = lock(&self.inner);
        if events
            .iter()
            .any(|e| g.poisoned.contains(&e.local_event_id))
        {
            return Err(Self::rejected(
                503,
                ErrorCode::PosSyncStorageFailed,
                "storage failed",
                None,
            ));
        }
        let mut results = Vec::with_capacity(events.len());
        for ev in events {
            let key = (ev.terminal_id, ev.pos_id, ev.local_event_id);
            let r = if let Err(why) = validate_event(ev) {
                EventResult {
                    local_event_id: Some(ev.local_event_id),
                    status: EventStatus::Rejected,
                    code: Some(ErrorCode::PosSyncEventInvalid),
                    cloud_event_id: None,
                    message: Some(why.to_string()),
                }
            } else {
                let hash = ev.payload_hash();
                match g.ledger.get(&key) {
                    Some((h, id)) if *h == hash => EventResult {
                        local_event_id: Some(ev.local_event_id),
                        status: EventStatus::Duplicate,
                        code: Some(ErrorCode::PosSyncEventDuplicate),
                        cloud_event_id: Some(*id),
                        message: None,
                    },
                    Some((_, id)) => EventResult {
                        local_event_id: Some(ev.local_event_id),
                        status: EventStatus::Conflict,
                        code: Some(ErrorCode::PosSyncEventDuplicate),
                        cloud_event_id: Some(*id),
                        message: Some("same key, different payload".into()),
                    },
                    None => {
                        let id = Uuid::now_v7();
                        g.ledger.insert(key, (hash, id));
                        g.stored_events += 1;
                        EventResult {
                            local_event_id: Some(ev.local_event_id),
                            status: EventStatus::Accepted,
                            code: None,
                            cloud_event_id: Some(id),
                            message: None,
                        }
                    }
                }
            };
            results.push(r);
        }
        match fault {
            Some(CloudFault::DropLastResult) => {
                results.pop();
            }
            Some(CloudFault::LoseAnswer) => {
                return Err(CloudError::Unreachable(
                    "connection reset after commit".into(),
                ));
            }
            _ => {}
        }
        Ok(SalesEventsResponse { results })
    }
}

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
