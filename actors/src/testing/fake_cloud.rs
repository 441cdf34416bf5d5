//! The scriptable in-memory `CloudApi`; it keeps the contract of `crate::cloud_contract`.

use super::*;

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
    /// A proxy in front of the cloud whose body limit is this many bytes: a larger
    /// `post_events` body is answered 413 with the proxy's page (no envelope), nothing stored.
    proxy_body_limit: Option<usize>,
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

    /// Puts a proxy with a body limit of `bytes` in front of `post_events` (see
    /// `CloudInner::proxy_body_limit`).
    pub fn set_proxy_body_limit(&self, bytes: usize) {
        lock(&self.inner).proxy_body_limit = Some(bytes);
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
        if let Some(limit) = g.proxy_body_limit {
            let body = serde_json::to_vec(&serde_json::json!({ "events": events }))
                .map_or(usize::MAX, |b| b.len());
            if body > limit {
                return Err(CloudError::Rejected {
                    status: 413,
                    code: None,
                    message: "<html><center><h1>413 Request Entity Too Large</h1></center></html>"
                        .into(),
                    retry_after: None,
                    reason: None,
                });
            }
        }
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
