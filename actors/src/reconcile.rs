//! `Reconciler`: compares the local catalog with the cloud's truth, key range by key range,
//! and either reports the drift (`Verify`) or repairs it (`Apply`).
//!
//! Ranges are consecutive and together cover the whole key space: `(None, k1]`, `(k1, k2]`, …,
//! `(kn, None)`. The last range is open so that entities the cloud has above our highest key
//! are found too. Each range's plan is applied in its own transaction, so an interrupted apply
//! leaves every range either repaired or untouched, and running it again finishes the job.

use possync_protocol::{
    ErrorCode, KeyRange, ManifestEntry, ReconcileMode, ReconcileRequest, ReconcileSummary,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

use crate::backoff::{self, Budget, Decision};
use crate::engine::{EngineError, SyncContext};
use crate::ports::CloudError;
use crate::status::ActorKind;

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconcileAction {
    /// Report drift; change nothing.
    Verify,
    /// Fetch the repair plan for every range and apply it.
    Apply,
}

/// The outcome of one reconcile run, summed over its ranges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    /// What was asked.
    pub mode: ReconcileAction,
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
}

/// Live state: the shared context only (each run starts from the store).
pub struct ReconcilerState {
    ctx: Arc<SyncContext>,
}

/// The actor that verifies and repairs the local catalog.
pub struct Reconciler;

impl Reconciler {
    async fn run(
        ctx: &SyncContext,
        action: ReconcileAction,
    ) -> Result<ReconcileReport, EngineError> {
        let cfg = &ctx.config;
        let mode = match action {
            ReconcileAction::Verify => ReconcileMode::Verify,
            ReconcileAction::Apply => ReconcileMode::Plan,
        };
        let mut report = ReconcileReport::new(action);
        let mut limit = cfg.reconcile_range_entries.max(1);
        let mut after: Option<String> = None;
        let mut failures = 0u32;
        loop {
            let from = after.clone();
            let fetched = ctx
                .store_call(move |s| s.manifest_after(from.as_deref(), limit + 1))
                .await?;
            let (range, entries, last) = cut_range(after.clone(), fetched, limit);
            ctx.board.set_state(
                ActorKind::Reconciler,
                format!(
                    "{} range {}",
                    if action == ReconcileAction::Verify {
                        "verifying"
                    } else {
                        "applying"
                    },
                    report.ranges + 1
                ),
            );
            let req = ReconcileRequest {
                mode,
                range: range.clone(),
                entries,
            };
            match ctx.cloud.reconcile(&req).await {
                Ok(resp) => {
                    ctx.backoff.report_contact(true);
                    failures = 0;
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
                    ctx.backoff.report_contact(true);
                    limit = shrink(limit).ok_or(EngineError::Cloud(e))?;
                    tracing::info!(
                        terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                        eventId = "reconcile", range_entries = limit,
                        errorCode = "POS_CATALOG_MANIFEST_TOO_LARGE", "manifest too large; shrinking ranges"
                    );
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
                        Decision::GiveUp => return Err(EngineError::Cloud(e)),
                    };
                    if wait > MAX_RETRY_WAIT {
                        return Err(EngineError::Cloud(e));
                    }
                    tracing::warn!(
                        terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                        eventId = "reconcile", syncAttempt = failures,
                        errorCode = %e.code_str(), "reconcile range failed; retrying"
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    ctx.backoff.report_contact(e.cloud_answered());
                    return Err(EngineError::Cloud(e));
                }
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
        ctx.board.set_state(ActorKind::Reconciler, "idle");
        Ok(ReconcilerState { ctx })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ReconcileMsg::Run { action, reply } => {
                let ctx = state.ctx.clone();
                ctx.metrics.reconcile_runs.inc();
                let result = Self::run(&ctx, action).await;
                let cfg = &ctx.config;
                let store_failed = match &result {
                    Ok(r) => {
                        tracing::info!(
                            terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                            eventId = "reconcile", mode = ?r.mode, ranges = r.ranges,
                            checked = r.checked, upserts = r.upserts, deletes = r.deletes,
                            applied = r.applied, "reconcile finished"
                        );
                        ctx.board.set_state(
                            ActorKind::Reconciler,
                            format!(
                                "idle (last {:?}: {} upserts, {} deletes)",
                                r.mode, r.upserts, r.deletes
                            )
                            .to_lowercase(),
                        );
                        None
                    }
                    Err(e) => {
                        tracing::warn!(
                            terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                            eventId = "reconcile", errorCode = %e.code(), error = %e, "reconcile failed"
                        );
                        ctx.board
                            .set_state(ActorKind::Reconciler, "idle (last run failed)");
                        ctx.board.set_error(ActorKind::Reconciler, e.to_string());
                        matches!(e, EngineError::Store(_)).then(|| e.to_string())
                    }
                };
                let _ = reply.send(result);
                // A store failure fails the actor so the supervisor restarts it fresh.
                if let Some(why) = store_failed {
                    return Err(why.into());
                }
                Ok(())
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
