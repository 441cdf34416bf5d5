//! The in-memory `LocalStore` the engine tests run on; it keeps the contract of `crate::store_contract`.

use super::*;

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
            .map(|(_, e)| manifest_entry(e))
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
            .map(|(_, e)| manifest_entry(e))
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
        // Past this, a retry time was set on a clock since stepped back (see the trait).
        let stepped = crate::backoff::retry_instant(now, crate::backoff::MAX_DELAY, Duration::ZERO);
        let mut due: Vec<&mut MemJournalRow> = g
            .journal
            .values_mut()
            .filter(|r| {
                r.status == "pending"
                    || (r.status == "failed"
                        && r.next_attempt_at.is_none_or(|t| t <= now || t > stepped))
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
