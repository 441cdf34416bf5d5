//! `CatalogSyncer`: keeps the local catalog a copy of the cloud's — one snapshot, then deltas.
//!
//! The decisions (which request to make next, what to do after a page or an error) are pure
//! functions of the stored [`CatalogPosition`]; the actor reads the position from the store
//! before every step. That is what makes a restart resume exactly where the last committed page
//! left off: there is no in-memory progress to lose.

use possync_protocol::{DeltaPage, ErrorCode, SnapshotPage};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::Arc;
use std::time::Duration;

use crate::backoff::{self, Budget, Decision};
use crate::context::SyncContext;
use crate::ports::{CatalogPosition, CloudError};
use crate::status::{ActorKind, ActorState};

/// The next call the syncer should make, derived from the stored position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogRequest {
    /// Fetch a snapshot page; `cursor: None` starts a fresh snapshot.
    Snapshot {
        /// Stored resume point.
        cursor: Option<String>,
    },
    /// Fetch changes after `since`.
    Delta {
        /// Version the local catalog is complete up to.
        since: i64,
    },
}

/// Decides the next request: an unfinished snapshot continues from its stored cursor; a
/// finished one is followed by deltas; no catalog at all starts a snapshot.
pub fn next_request(pos: &CatalogPosition) -> CatalogRequest {
    if pos.snapshot_in_progress {
        return CatalogRequest::Snapshot {
            cursor: pos.snapshot_cursor.clone(),
        };
    }
    match pos.catalog_version {
        Some(since) => CatalogRequest::Delta { since },
        None => CatalogRequest::Snapshot { cursor: None },
    }
}

/// What to do after a page was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterPage {
    /// More to fetch right away (next snapshot page, catch-up delta, or `has_more`).
    Continue,
    /// Caught up: wait for the delta interval or a nudge.
    Idle,
}

/// After a snapshot page (last or not) there is more to do at once: the next page, or the
/// first delta that catches up with changes made while the snapshot was paged. After a delta
/// page, continue only while the cloud says `has_more`.
pub fn after_snapshot_page(_page: &SnapshotPage) -> AfterPage {
    AfterPage::Continue
}

/// See [`after_snapshot_page`].
pub fn after_delta_page(page: &DeltaPage) -> AfterPage {
    if page.has_more {
        AfterPage::Continue
    } else {
        AfterPage::Idle
    }
}

/// What to do after a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogRecovery {
    /// Our position is no longer servable: forget it and take a fresh snapshot.
    Resnapshot,
    /// Try the same request again after a backoff delay.
    RetryLater,
}

/// 410 / `resnapshot_required` on a delta, or a 400 on a snapshot cursor we stored (the
/// cloud no longer recognises it), mean our position is gone: snapshot again. Everything else
/// is retried with backoff — including non-retryable codes such as 401, since the catalog must
/// keep trying (slowly) until an operator fixes the enrollment.
pub fn recovery_for(request: &CatalogRequest, err: &CloudError) -> CatalogRecovery {
    if err.resnapshot_required() {
        return CatalogRecovery::Resnapshot;
    }
    if let (
        CatalogRequest::Snapshot { cursor: Some(_) },
        CloudError::Rejected {
            status: 400,
            code: Some(ErrorCode::PosCatalogSnapshotFailed),
            ..
        },
    ) = (request, err)
    {
        return CatalogRecovery::Resnapshot;
    }
    CatalogRecovery::RetryLater
}

/// Status line for a position: snapshot progress, or idle at a version.
pub fn position_state(pos: &CatalogPosition) -> ActorState {
    if pos.snapshot_in_progress || pos.catalog_version.is_none() {
        ActorState::Snapshotting {
            received: pos.snapshot_received,
            total: pos.snapshot_total,
        }
    } else {
        ActorState::Idle
    }
}

/// A page the cloud returned, tagged with whether it started a fresh snapshot.
#[derive(Debug)]
pub enum CatalogPage {
    /// A snapshot page; `true` when it was fetched without a cursor.
    Snapshot(SnapshotPage, bool),
    /// A delta page.
    Delta(DeltaPage),
}

/// Messages of the [`CatalogSyncer`].
#[derive(Debug)]
pub enum CatalogMsg {
    /// Take one step if `generation` is still current (stale timers are ignored).
    Tick(u64),
    /// Operator or daemon asked for a sync now.
    SyncNow,
    /// The cloud call of the current step finished.
    Fetched {
        /// Which call (a call aborted since is ignored).
        fetch: u64,
        /// What was asked.
        request: CatalogRequest,
        /// What came back.
        result: Result<CatalogPage, CloudError>,
    },
}

/// The cloud call in progress. It runs as its own task so the actor stays responsive (a stop
/// or a nudge does not wait for a slow network) and so the next snapshot page can be fetched
/// while the current one is written; dropping it — the actor stopped or failed, or the
/// prefetched page is no longer the one the stored position asks for — aborts the call.
struct FetchTask {
    handle: tokio::task::JoinHandle<()>,
    /// Tags its `Fetched` message.
    fetch: u64,
    request: CatalogRequest,
}

impl Drop for FetchTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Live state: only pacing; the position lives in the store.
pub struct CatalogState {
    ctx: Arc<SyncContext>,
    generation: u64,
    failures: u32,
    fetching: Option<FetchTask>,
    /// Numbers the calls, so the answer of an aborted one is recognised and dropped.
    fetches: u64,
    /// A nudge arrived while a call was in progress: continue at once after it.
    nudged: bool,
}

/// The actor that pulls the catalog.
pub struct CatalogSyncer;

impl CatalogSyncer {
    fn schedule(myself: &ActorRef<CatalogMsg>, state: &mut CatalogState, delay: Duration) {
        state.generation = state.generation.wrapping_add(1);
        let generation = state.generation;
        let delay = if std::mem::take(&mut state.nudged) {
            Duration::ZERO
        } else {
            delay
        };
        if delay.is_zero() {
            let _ = myself.cast(CatalogMsg::Tick(generation));
        } else {
            // A stale or dead target just drops the tick.
            drop(myself.send_after(delay, move || CatalogMsg::Tick(generation)));
        }
    }

    /// Reads the position and starts the cloud call it calls for.
    async fn begin_step(
        myself: &ActorRef<CatalogMsg>,
        state: &mut CatalogState,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = state.ctx.clone();
        let pos = ctx.store_call(|s| s.catalog_position()).await?;
        ctx.board.set_catalog(pos.clone());
        Self::start_fetch(myself, state, next_request(&pos));
        Ok(())
    }

    /// Starts the cloud call for `request` as its own task (see [`FetchTask`]).
    fn start_fetch(
        myself: &ActorRef<CatalogMsg>,
        state: &mut CatalogState,
        request: CatalogRequest,
    ) {
        let ctx = &state.ctx;
        let me = myself.clone();
        let cloud = ctx.cloud.clone();
        let (snapshot_limit, delta_limit) =
            (ctx.config.snapshot_page_limit, ctx.config.delta_page_limit);
        state.fetches = state.fetches.wrapping_add(1);
        let fetch = state.fetches;
        let asked = request.clone();
        let handle = tokio::spawn(async move {
            let result = match &asked {
                CatalogRequest::Snapshot { cursor } => cloud
                    .snapshot(cursor.as_deref(), snapshot_limit)
                    .await
                    .map(|p| CatalogPage::Snapshot(p, cursor.is_none())),
                CatalogRequest::Delta { since } => cloud
                    .delta(*since, delta_limit)
                    .await
                    .map(CatalogPage::Delta),
            };
            let _ = me.cast(CatalogMsg::Fetched {
                fetch,
                request: asked,
                result,
            });
        });
        state.fetching = Some(FetchTask {
            handle,
            fetch,
            request,
        });
    }

    /// Stores what the call returned (or recovers from its failure) and schedules the next step.
    async fn finish_step(
        myself: &ActorRef<CatalogMsg>,
        state: &mut CatalogState,
        request: CatalogRequest,
        result: Result<CatalogPage, CloudError>,
    ) -> Result<(), ActorProcessingErr> {
        state.fetching = None;
        let ctx = state.ctx.clone();
        let cfg = &ctx.config;
        match result {
            Ok(page) => {
                ctx.backoff.report_contact(true);
                state.failures = 0;
                let next = match page {
                    CatalogPage::Snapshot(page, fresh) => {
                        let next = after_snapshot_page(&page);
                        // Pipeline: page N+1 travels while page N is written. Its answer
                        // waits in the mailbox until this step is done.
                        if let Some(cursor) = &page.next_cursor {
                            let ahead = CatalogRequest::Snapshot {
                                cursor: Some(cursor.clone()),
                            };
                            Self::start_fetch(myself, state, ahead);
                        }
                        ctx.store_call(move |s| s.apply_snapshot_page(&page, fresh))
                            .await?;
                        ctx.metrics.snapshot_pages.inc();
                        next
                    }
                    CatalogPage::Delta(page) => {
                        let next = after_delta_page(&page);
                        if !page.changes.is_empty() {
                            tracing::info!(
                                terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                                eventId = "catalog", syncAttempt = 1u32,
                                changes = page.changes.len(), next_since = page.next_since,
                                "catalog delta applied"
                            );
                        }
                        ctx.store_call(move |s| s.apply_delta_page(&page)).await?;
                        ctx.metrics.delta_sync_runs.inc();
                        next
                    }
                };
                let pos = ctx.store_call(|s| s.catalog_position()).await?;
                ctx.board
                    .set_state(ActorKind::CatalogSyncer, position_state(&pos));
                // A prefetched page is used only if it is the one the stored position asks
                // for next (it always is, unless the position was reset meanwhile).
                if state
                    .fetching
                    .as_ref()
                    .is_some_and(|f| f.request != next_request(&pos))
                {
                    state.fetching = None;
                }
                ctx.board.set_catalog(pos);
                let delay = match next {
                    AfterPage::Continue => Duration::ZERO,
                    AfterPage::Idle => cfg.delta_interval,
                };
                Self::schedule(myself, state, delay);
            }
            Err(err) => {
                let reachable = err.cloud_answered();
                ctx.backoff.report_contact(reachable);
                ctx.board
                    .set_error(ActorKind::CatalogSyncer, err.to_string());
                match recovery_for(&request, &err) {
                    CatalogRecovery::Resnapshot => {
                        tracing::warn!(
                            terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                            eventId = "catalog", syncAttempt = state.failures + 1,
                            errorCode = %err.code(), "catalog position expired; taking a fresh snapshot"
                        );
                        ctx.store_call(|s| s.require_resnapshot()).await?;
                        state.failures = 0;
                        Self::schedule(myself, state, Duration::ZERO);
                    }
                    CatalogRecovery::RetryLater => {
                        state.failures = state.failures.saturating_add(1);
                        // The catalog never gives up: past max_attempts it keeps the capped pace.
                        let failures = state.failures.max(1);
                        let now = ctx.now();
                        let when = match backoff::ask(
                            ctx.backoff.get(),
                            &cfg.backoff,
                            failures,
                            Budget::Unbounded,
                            err.retry_after(),
                            now,
                        )
                        .await
                        {
                            Decision::RetryAt(t) => t,
                            Decision::GiveUp => {
                                backoff::retry_instant(now, cfg.backoff.cap, cfg.backoff.cap)
                            }
                        };
                        let delay = (when - now).to_std().unwrap_or(Duration::ZERO);
                        ctx.board.set_state(
                            ActorKind::CatalogSyncer,
                            if reachable {
                                ActorState::BackingOff { until: when }
                            } else {
                                ActorState::Offline { until: when }
                            },
                        );
                        tracing::warn!(
                            terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                            eventId = "catalog", syncAttempt = state.failures,
                            errorCode = %err.code(), retry_in_ms = delay.as_millis() as u64,
                            "catalog sync failed; will retry"
                        );
                        Self::schedule(myself, state, delay);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Actor for CatalogSyncer {
    type Msg = CatalogMsg;
    type State = CatalogState;
    type Arguments = Arc<SyncContext>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        ctx: Arc<SyncContext>,
    ) -> Result<Self::State, ActorProcessingErr> {
        // No I/O here: a failure in pre_start escapes supervision. The first tick loads the
        // position from the store.
        let mut state = CatalogState {
            ctx,
            generation: 0,
            failures: 0,
            fetching: None,
            fetches: 0,
            nudged: false,
        };
        state
            .ctx
            .board
            .set_state(ActorKind::CatalogSyncer, ActorState::Starting);
        Self::schedule(&myself, &mut state, Duration::ZERO);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            CatalogMsg::Tick(g) if g == state.generation && state.fetching.is_none() => {
                Self::begin_step(&myself, state).await
            }
            CatalogMsg::Tick(_) => Ok(()),
            CatalogMsg::SyncNow if state.fetching.is_some() => {
                state.nudged = true;
                Ok(())
            }
            CatalogMsg::SyncNow => {
                Self::schedule(&myself, state, Duration::ZERO);
                Ok(())
            }
            CatalogMsg::Fetched {
                fetch,
                request,
                result,
            } if state.fetching.as_ref().is_some_and(|f| f.fetch == fetch) => {
                Self::finish_step(&myself, state, request, result).await
            }
            // The answer of a call aborted since.
            CatalogMsg::Fetched { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(status: u16, code: Option<ErrorCode>, reason: Option<&str>) -> CloudError {
        CloudError::Rejected {
            status,
            code,
            message: "x".into(),
            retry_after: None,
            reason: reason.map(str::to_string),
        }
    }

    #[test]
    fn no_catalog_means_fresh_snapshot_and_progress_resumes_from_the_cursor() {
        assert_eq!(
            next_request(&CatalogPosition::default()),
            CatalogRequest::Snapshot { cursor: None }
        );
        let mid = CatalogPosition {
            snapshot_in_progress: true,
            snapshot_cursor: Some("c2".into()),
            ..CatalogPosition::default()
        };
        assert_eq!(
            next_request(&mid),
            CatalogRequest::Snapshot {
                cursor: Some("c2".into())
            }
        );
        let done = CatalogPosition {
            catalog_version: Some(42),
            ..CatalogPosition::default()
        };
        assert_eq!(next_request(&done), CatalogRequest::Delta { since: 42 });
    }

    #[test]
    fn gone_history_or_stale_cursor_means_resnapshot() {
        let delta = CatalogRequest::Delta { since: 1 };
        assert_eq!(
            recovery_for(
                &delta,
                &rejected(
                    410,
                    Some(ErrorCode::PosCatalogDeltaFailed),
                    Some("resnapshot_required")
                )
            ),
            CatalogRecovery::Resnapshot
        );
        let resume = CatalogRequest::Snapshot {
            cursor: Some("c".into()),
        };
        assert_eq!(
            recovery_for(
                &resume,
                &rejected(400, Some(ErrorCode::PosCatalogSnapshotFailed), None)
            ),
            CatalogRecovery::Resnapshot
        );
        assert_eq!(
            recovery_for(
                &delta,
                &rejected(503, Some(ErrorCode::PosSyncStorageFailed), None)
            ),
            CatalogRecovery::RetryLater
        );
        assert_eq!(
            recovery_for(&delta, &CloudError::Unreachable("down".into())),
            CatalogRecovery::RetryLater
        );
    }

    #[test]
    fn deltas_continue_only_while_has_more() {
        let page = |has_more| DeltaPage {
            changes: vec![],
            next_since: 5,
            has_more,
            catalog_version: 9,
        };
        assert_eq!(after_delta_page(&page(true)), AfterPage::Continue);
        assert_eq!(after_delta_page(&page(false)), AfterPage::Idle);
    }

    #[test]
    fn state_line_shows_snapshot_progress() {
        let p = CatalogPosition {
            snapshot_in_progress: true,
            snapshot_received: 3000,
            snapshot_total: 100_000,
            ..CatalogPosition::default()
        };
        assert_eq!(position_state(&p).to_string(), "snapshotting 3000/100000");
    }
}
