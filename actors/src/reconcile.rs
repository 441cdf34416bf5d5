//! `Reconciler`: compares the local catalog with the cloud's truth and either reports the
//! drift (`Verify`) or repairs it (`Apply`).
//!
//! **Fingerprints first** (O(changed)): the local catalog's fingerprint tree
//! (`possync_protocol::fingerprint`) is compared with the cloud's level by level, descending
//! only into nodes that differ; only the leaves that differ are reconciled entry by entry. With
//! no drift that is one round trip of ~1.5 KB whatever the catalog's size. A cloud that does not
//! know the fingerprint routes (404) gets the manifest walk below.
//!
//! **Manifest walk** (the original protocol, kept for old clouds): key range by key range.
//! Ranges are consecutive and together cover the whole key space: `(None, k1]`, `(k1, k2]`, …,
//! `(kn, None)`. The last range is open so that entities the cloud has above our highest key
//! are found too. Each range's plan is applied in its own transaction, so an interrupted apply
//! leaves every range either repaired or untouched, and running it again finishes the job.

use possync_protocol::fingerprint::{
    leaf_of, next_step, FingerprintRequest, LeafReconcileRequest, NodeId, MAX_LEAVES_PER_RECONCILE,
    MAX_NODES_PER_REQUEST,
};
use possync_protocol::{
    EntityKey, ErrorCode, KeyRange, ManifestEntry, ReconcileMode, ReconcileRequest,
    ReconcileSummary,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

use crate::backoff::{self, Budget, Decision};
use crate::context::{EngineError, SyncContext};
use crate::ports::CloudError;
use crate::status::{ActorKind, ActorState, VerifyOutcome};

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconcileAction {
    /// Report drift; change nothing.
    Verify,
    /// Fetch the repair plan for every range and apply it.
    Apply,
}

impl ReconcileAction {
    /// The protocol mode that asks the cloud for this action.
    pub fn mode(self) -> ReconcileMode {
        match self {
            ReconcileAction::Verify => ReconcileMode::Verify,
            ReconcileAction::Apply => ReconcileMode::Plan,
        }
    }
}

/// How a run compared the catalogs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyMethod {
    /// Fingerprint descent, then only the differing leaves.
    Fingerprints,
    /// The whole manifest, range by range (clouds without the fingerprint routes).
    Manifest,
}

/// The outcome of one reconcile run, summed over its ranges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    /// What was asked.
    pub mode: ReconcileAction,
    /// How the catalogs were compared.
    pub method: VerifyMethod,
    /// Requests to the cloud this run made (fingerprints and reconcile calls).
    pub round_trips: u64,
    /// Request body bytes sent.
    pub bytes_sent: u64,
    /// Response body bytes received, as they came over the wire.
    pub bytes_received: u64,
    /// Ranges sent.
    pub ranges: usize,
    /// Local entries compared.
    pub checked: i64,
    /// Local entries equal to the cloud's.
    pub unchanged: i64,
    /// Entities missing locally or different from the cloud.
    pub upserts: i64,
    /// Local entities the cloud does not hold (for this branch).
    pub deletes: i64,
    /// Whether the plans were applied (only for `Apply`).
    pub applied: bool,
    /// Highest catalog version the cloud reported during the run.
    pub catalog_version: Option<i64>,
}

impl ReconcileReport {
    fn new(mode: ReconcileAction) -> Self {
        ReconcileReport {
            mode,
            method: VerifyMethod::Fingerprints,
            round_trips: 0,
            bytes_sent: 0,
            bytes_received: 0,
            ranges: 0,
            checked: 0,
            unchanged: 0,
            upserts: 0,
            deletes: 0,
            applied: false,
            catalog_version: None,
        }
    }

    fn add(&mut self, s: &ReconcileSummary, version: i64) {
        self.ranges += 1;
        self.checked += s.checked;
        self.unchanged += s.unchanged;
        self.upserts += s.upserts;
        self.deletes += s.deletes;
        self.catalog_version = Some(self.catalog_version.map_or(version, |v| v.max(version)));
    }
}

/// Cuts the next range from entries fetched after `after` (fetch `limit + 1` so the last range
/// is recognised without an extra query). Returns the range, its entries (≤ `limit`), and
/// whether it is the final, open-ended range.
pub fn cut_range(
    after: Option<String>,
    mut fetched: Vec<ManifestEntry>,
    limit: usize,
) -> (KeyRange, Vec<ManifestEntry>, bool) {
    let limit = limit.max(1);
    if fetched.len() <= limit {
        return (
            KeyRange {
                after,
                through: None,
            },
            fetched,
            true,
        );
    }
    fetched.truncate(limit);
    let through = fetched
        .last()
        .map(|e| possync_protocol::EntityKey::new(&e.entity_type, &e.id).to_string());
    (KeyRange { after, through }, fetched, false)
}

/// The manifest was too big for the server: the range size to try next, or `None` when it
/// cannot shrink further.
pub fn shrink(limit: usize) -> Option<usize> {
    (limit > 1).then_some(limit / 2)
}

fn too_large(e: &CloudError) -> bool {
    matches!(
        e,
        CloudError::Rejected {
            code: Some(ErrorCode::PosCatalogManifestTooLarge),
            ..
        } | CloudError::Rejected { status: 413, .. }
    )
}

/// Transient errors are retried this many times within one run before it fails.
const MAX_TRANSIENT_RETRIES: u32 = 3;
/// A retry that would wait longer than this fails the run instead (an operator is waiting).
const MAX_RETRY_WAIT: Duration = Duration::from_secs(15);

/// Messages of the [`Reconciler`].
#[derive(Debug)]
pub enum ReconcileMsg {
    /// Walks every range once; the report (or the first error) goes to `reply`.
    Run {
        /// Verify or apply.
        action: ReconcileAction,
        /// Where the result goes (forwarded from the engine facade).
        reply: RpcReplyPort<Result<ReconcileReport, EngineError>>,
    },
    /// The automatic verify is due (see `EngineConfig::verify_every`).
    ScheduledVerify,
}

/// Live state: the shared context only (each run starts from the store).
pub struct ReconcilerState {
    ctx: Arc<SyncContext>,
}

/// The actor that verifies and repairs the local catalog.
pub struct Reconciler;

/// Whether the cloud does not know a route (an older cloud): fall back to the manifest walk.
fn route_unknown(e: &CloudError) -> bool {
    matches!(
        e,
        CloudError::Rejected {
            status: 404 | 405,
            ..
        }
    )
}

/// Calls the cloud, retrying transient failures as the range walk does (three times, never
/// waiting longer than [`MAX_RETRY_WAIT`]: an operator may be waiting for the answer).
async fn with_retries<T, F, Fut>(
    ctx: &SyncContext,
    what: &str,
    mut call: F,
) -> Result<T, CloudError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, CloudError>>,
{
    let cfg = &ctx.config;
    let mut failures = 0u32;
    loop {
        match call().await {
            Ok(v) => {
                ctx.backoff.report_contact(true);
                return Ok(v);
            }
            Err(e) if e.can_retry() && failures < MAX_TRANSIENT_RETRIES => {
                ctx.backoff.report_contact(e.cloud_answered());
                failures += 1;
                let now = ctx.now();
                let wait = match backoff::ask(
                    ctx.backoff.get(),
                    &cfg.backoff,
                    failures,
                    Budget::Attempts,
                    e.retry_after(),
                    now,
                )
                .await
                {
                    Decision::RetryAt(t) => (t - now).to_std().unwrap_or(Duration::ZERO),
                    Decision::GiveUp => return Err(e),
                };
                if wait > MAX_RETRY_WAIT {
                    return Err(e);
                }
                tracing::warn!(
                    terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                    eventId = "reconcile", syncAttempt = failures,
                    errorCode = %e.code(), "{what} failed; retrying"
                );
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                ctx.backoff.report_contact(e.cloud_answered());
                return Err(e);
            }
        }
    }
}

/// Groups differing leaves into leaf reconcile requests: at most
/// [`MAX_LEAVES_PER_RECONCILE`] leaves each, and (by halving) at most `max_entries` local
/// entries where a split is possible (a single leaf always goes, whatever it holds).
pub fn leaf_groups(
    leaves: &[u32],
    entries_in: &dyn Fn(&[u32]) -> usize,
    max_entries: usize,
) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    let mut stack: Vec<Vec<u32>> = leaves
        .chunks(MAX_LEAVES_PER_RECONCILE)
        .rev()
        .map(<[u32]>::to_vec)
        .collect();
    while let Some(group) = stack.pop() {
        if group.len() > 1 && entries_in(&group) > max_entries {
            let (a, b) = group.split_at(group.len() / 2);
            stack.push(b.to_vec());
            stack.push(a.to_vec());
        } else {
            out.push(group);
        }
    }
    out
}

impl Reconciler {
    async fn run(
        ctx: &SyncContext,
        action: ReconcileAction,
    ) -> Result<ReconcileReport, EngineError> {
        let before = ctx.cloud.reconcile_traffic();
        let mut report = match Self::run_fingerprints(ctx, action).await {
            Err(EngineError::Cloud(e)) if route_unknown(&e) => {
                tracing::info!(
                    terminalId = %ctx.config.terminal_id, branchId = %ctx.config.branch_id,
                    eventId = "reconcile", "cloud has no fingerprint routes; walking the manifest"
                );
                Self::run_ranges(ctx, action).await?
            }
            other => other?,
        };
        let cost = ctx.cloud.reconcile_traffic().since(before);
        report.round_trips = cost.requests;
        report.bytes_sent = cost.bytes_sent;
        report.bytes_received = cost.bytes_received;
        Ok(report)
    }

    /// The O(changed) run: fingerprint descent, then the differing leaves.
    async fn run_fingerprints(
        ctx: &SyncContext,
        action: ReconcileAction,
    ) -> Result<ReconcileReport, EngineError> {
        let cfg = &ctx.config;
        let mode = action.mode();
        let mut report = ReconcileReport::new(action);
        ctx.board
            .set_state(ActorKind::Reconciler, ActorState::Fingerprinting);
        let local = Arc::new(ctx.store_call(|s| s.fingerprint_tree()).await?);
        // The root is the sum of its children: asking the 16 children answers both.
        let mut ask = NodeId::ROOT.children();
        let mut differing: Vec<u32> = Vec::new();
        let mut version: Option<i64> = None;
        while !ask.is_empty() {
            ctx.board.set_state(
                ActorKind::Reconciler,
                ActorState::ComparingFingerprints {
                    level: ask[0].level,
                },
            );
            let mut next = Vec::new();
            for chunk in ask.chunks(MAX_NODES_PER_REQUEST) {
                let req = FingerprintRequest {
                    nodes: chunk.to_vec(),
                };
                let resp = with_retries(ctx, "fingerprints", || ctx.cloud.fingerprints(&req))
                    .await
                    .map_err(EngineError::Cloud)?;
                version =
                    Some(version.map_or(resp.catalog_version, |v| v.max(resp.catalog_version)));
                let (more, leaves) = next_step(&local, &resp.nodes);
                next.extend(more);
                differing.extend(leaves);
            }
            ask = next;
        }
        report.catalog_version = version;
        if differing.is_empty() {
            report.checked = i64::try_from(local.count()).unwrap_or(i64::MAX);
            report.unchanged = report.checked;
            report.applied = action == ReconcileAction::Apply;
            return Ok(report);
        }
        // Local entries of the differing leaves, read once and filed by leaf; groups bounded by
        // the entry limit.
        let wanted = differing.clone();
        let entries = ctx
            .store_call(move |s| s.manifest_in_leaves(&wanted))
            .await?;
        let held = entries.len();
        let mut by_leaf: std::collections::HashMap<u32, Vec<ManifestEntry>> =
            std::collections::HashMap::new();
        for e in entries {
            let leaf = leaf_of(EntityKey::new(&e.entity_type, &e.id).as_str());
            by_leaf.entry(leaf).or_default().push(e);
        }
        let count_in = |leaves: &[u32]| {
            leaves
                .iter()
                .map(|l| by_leaf.get(l).map_or(0, Vec::len))
                .sum::<usize>()
        };
        let groups = leaf_groups(&differing, &count_in, cfg.reconcile_range_entries.max(1));
        for (i, leaves) in groups.into_iter().enumerate() {
            ctx.board.set_state(
                ActorKind::Reconciler,
                ActorState::Reconciling {
                    apply: action == ReconcileAction::Apply,
                    leaves: true,
                    number: i + 1,
                },
            );
            let req = LeafReconcileRequest {
                mode,
                entries: leaves
                    .iter()
                    .filter_map(|l| by_leaf.get(l))
                    .flatten()
                    .cloned()
                    .collect(),
                leaves,
            };
            let resp = with_retries(ctx, "leaf reconcile", || ctx.cloud.reconcile_leaves(&req))
                .await
                .map_err(EngineError::Cloud)?;
            if action == ReconcileAction::Apply {
                let plan = resp.plan;
                let at = resp.catalog_version;
                ctx.store_call(move |s| s.apply_reconcile_plan(&KeyRange::default(), &plan, at))
                    .await?;
            }
            report.add(&resp.summary, resp.catalog_version);
        }
        // Leaves that matched count as checked and unchanged (the whole catalog was compared).
        let matched =
            i64::try_from(local.count()).unwrap_or(i64::MAX) - i64::try_from(held).unwrap_or(0);
        report.checked += matched.max(0);
        report.unchanged += matched.max(0);
        report.applied = action == ReconcileAction::Apply;
        Ok(report)
    }

    /// The manifest walk, range by range (clouds without fingerprints).
    async fn run_ranges(
        ctx: &SyncContext,
        action: ReconcileAction,
    ) -> Result<ReconcileReport, EngineError> {
        let cfg = &ctx.config;
        let mode = action.mode();
        let mut report = ReconcileReport::new(action);
        report.method = VerifyMethod::Manifest;
        let mut limit = cfg.reconcile_range_entries.max(1);
        let mut after: Option<String> = None;
        loop {
            let from = after.clone();
            let fetched = ctx
                .store_call(move |s| s.manifest_after(from.as_deref(), limit + 1))
                .await?;
            let (range, entries, last) = cut_range(after.clone(), fetched, limit);
            ctx.board.set_state(
                ActorKind::Reconciler,
                ActorState::Reconciling {
                    apply: action == ReconcileAction::Apply,
                    leaves: false,
                    number: report.ranges + 1,
                },
            );
            let req = ReconcileRequest {
                mode,
                range: range.clone(),
                entries,
            };
            match with_retries(ctx, "reconcile range", || ctx.cloud.reconcile(&req)).await {
                Ok(resp) => {
                    if action == ReconcileAction::Apply {
                        let plan = resp.plan;
                        let r = range.clone();
                        let at = resp.catalog_version;
                        ctx.store_call(move |s| s.apply_reconcile_plan(&r, &plan, at))
                            .await?;
                    }
                    report.add(&resp.summary, resp.catalog_version);
                    if last {
                        break;
                    }
                    after = range.through;
                }
                Err(e) if too_large(&e) => {
                    limit = shrink(limit).ok_or(EngineError::Cloud(e))?;
                    tracing::info!(
                        terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                        eventId = "reconcile", range_entries = limit,
                        errorCode = %possync_protocol::ErrorCode::PosCatalogManifestTooLarge, "manifest too large; shrinking ranges"
                    );
                }
                Err(e) => return Err(EngineError::Cloud(e)),
            }
        }
        report.applied = action == ReconcileAction::Apply;
        Ok(report)
    }
}

impl Actor for Reconciler {
    type Msg = ReconcileMsg;
    type State = ReconcilerState;
    type Arguments = Arc<SyncContext>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        ctx: Arc<SyncContext>,
    ) -> Result<Self::State, ActorProcessingErr> {
        ctx.board.set_state(ActorKind::Reconciler, ActorState::Idle);
        Ok(ReconcilerState { ctx })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(every) = state.ctx.config.verify_every {
            // A random point of the first period: a fleet started at once spreads its verifies.
            let first = every.mul_f64(rand::random::<f64>());
            drop(myself.send_after(first, || ReconcileMsg::ScheduledVerify));
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = state.ctx.clone();
        let (action, reply, scheduled) = match message {
            ReconcileMsg::Run { action, reply } => (action, Some(reply), false),
            ReconcileMsg::ScheduledVerify => {
                if let Some(every) = ctx.config.verify_every {
                    drop(myself.send_after(every, || ReconcileMsg::ScheduledVerify));
                }
                (ReconcileAction::Verify, None, true)
            }
        };
        ctx.metrics.reconcile_runs.inc();
        let result = Self::run(&ctx, action).await;
        let store_failed = Self::record(&ctx, action, scheduled, &result);
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
        // A store failure fails the actor so the supervisor restarts it fresh.
        if let Some(why) = store_failed {
            return Err(why.into());
        }
        Ok(())
    }
}

impl Reconciler {
    /// Logs a finished run and puts it on the board and the metrics; returns the error text
    /// of a store failure (which must fail the actor).
    fn record(
        ctx: &SyncContext,
        action: ReconcileAction,
        scheduled: bool,
        result: &Result<ReconcileReport, EngineError>,
    ) -> Option<String> {
        let cfg = &ctx.config;
        match result {
            Ok(r) => {
                tracing::info!(
                    terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                    eventId = "reconcile", mode = ?r.mode, method = ?r.method, ranges = r.ranges,
                    checked = r.checked, upserts = r.upserts, deletes = r.deletes,
                    round_trips = r.round_trips, bytes_sent = r.bytes_sent,
                    bytes_received = r.bytes_received, scheduled,
                    applied = r.applied, "reconcile finished"
                );
                ctx.metrics
                    .reconcile_bytes
                    .inc_by(r.bytes_sent + r.bytes_received);
                ctx.board.set_state(
                    ActorKind::Reconciler,
                    ActorState::Reconciled {
                        apply: r.mode == ReconcileAction::Apply,
                        upserts: r.upserts,
                        deletes: r.deletes,
                    },
                );
                if action == ReconcileAction::Verify {
                    ctx.metrics
                        .catalog_drift_entities
                        .set(r.upserts + r.deletes);
                    ctx.board.set_verify(VerifyOutcome {
                        at: ctx.now(),
                        scheduled,
                        drift_entities: Some(r.upserts + r.deletes),
                        round_trips: r.round_trips,
                        bytes: r.bytes_sent + r.bytes_received,
                        error: None,
                    });
                }
                None
            }
            Err(e) => {
                tracing::warn!(
                    terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                    eventId = "reconcile", errorCode = %e.code(), error = %e, scheduled,
                    "reconcile failed"
                );
                ctx.board
                    .set_state(ActorKind::Reconciler, ActorState::ReconcileFailed);
                ctx.board.set_error(ActorKind::Reconciler, e.to_string());
                if action == ReconcileAction::Verify {
                    ctx.board.set_verify(VerifyOutcome {
                        at: ctx.now(),
                        scheduled,
                        drift_entities: None,
                        round_trips: 0,
                        bytes: 0,
                        error: Some(e.to_string()),
                    });
                }
                matches!(e, EngineError::Store(_)).then(|| e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u32) -> ManifestEntry {
        ManifestEntry {
            entity_type: "product".into(),
            id: format!("{id:04}"),
            version: 1,
            hash: "h".into(),
        }
    }

    #[test]
    fn a_full_range_ends_at_its_last_key_and_the_short_one_is_open() {
        let (r, e, last) = cut_range(None, (1..=4).map(entry).collect(), 3);
        assert_eq!(e.len(), 3);
        assert!(!last);
        assert_eq!(r.through.as_deref(), Some("product/0003"));
        let (r, e, last) = cut_range(Some("product/0003".into()), vec![entry(4)], 3);
        assert!(last);
        assert_eq!(e.len(), 1);
        assert_eq!(r.after.as_deref(), Some("product/0003"));
        assert_eq!(r.through, None);
    }

    #[test]
    fn an_empty_manifest_is_one_open_range() {
        let (r, e, last) = cut_range(None, vec![], 2000);
        assert!(last && e.is_empty());
        assert_eq!(r, KeyRange::default());
    }

    proptest::proptest! {
        #[test]
        fn ranges_partition_the_manifest(n in 0u32..60, limit in 1usize..12) {
            let all: Vec<ManifestEntry> = (1..=n).map(entry).collect();
            let mut after: Option<String> = None;
            let mut seen = Vec::new();
            let mut ranges = 0;
            loop {
                let fetched: Vec<ManifestEntry> = all
                    .iter()
                    .filter(|e| after.as_deref().is_none_or(|a| format!("product/{}", e.id).as_str() > a))
                    .take(limit + 1)
                    .cloned()
                    .collect();
                let (range, entries, last) = cut_range(after.clone(), fetched, limit);
                proptest::prop_assert!(entries.len() <= limit);
                proptest::prop_assert_eq!(&range.after, &after);
                for e in &entries {
                    let key = format!("product/{}", e.id);
                    proptest::prop_assert!(range.contains(&key));
                }
                seen.extend(entries);
                ranges += 1;
                if last {
                    proptest::prop_assert_eq!(range.through, None);
                    break;
                }
                after = range.through;
            }
            proptest::prop_assert_eq!(seen, all);
            proptest::prop_assert!(ranges <= (n as usize) / limit + 1);
        }
    }

    #[test]
    fn shrinking_halves_down_to_one() {
        assert_eq!(shrink(2000), Some(1000));
        assert_eq!(shrink(3), Some(1));
        assert_eq!(shrink(1), None);
    }
}
