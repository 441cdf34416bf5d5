//! `SyncSupervisor`: starts the four sync actors and restarts any that fails (its state is
//! reloaded from the store by the new instance), for as long as the process runs.
//!
//! Invariant: a failed actor is always restarted. A persistent fault (a full disk, a database
//! locked by another program) must not leave the `SalesOutbox` down until someone restarts the
//! daemon — systemd would not, because the process stays alive — and it must not spin either.
//! So the first failure is restarted at once (a one-off panic costs nothing), and each further
//! failure in a row waits twice as long as the one before, from `restart_delay_base` up to
//! `restart_delay_cap` (defaults 100 ms, 30 s; [`restart_delay`]). An actor that ran for
//! `restart_window` (60 s) since its last restart counts as healthy again. While it waits the
//! status shows `restarting at <time> (failed <n> times in a row)` with the last error, so a
//! persistent fault is visible on the page without the engine ever giving up.

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use crate::backoff::{Backoff, BackoffArgs};
use crate::catalog::{CatalogMsg, CatalogSyncer};
use crate::context::{EngineError, SyncContext};
use crate::outbox::{OutboxMsg, SalesOutbox};
use crate::reconcile::{ReconcileAction, ReconcileMsg, ReconcileReport, Reconciler};
use crate::status::{ActorKind, ActorState};

/// Messages of the [`SyncSupervisor`]; the engine facade talks only to it.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Nudge the CatalogSyncer; answers whether it is running.
    SyncCatalogNow(RpcReplyPort<Result<(), EngineError>>),
    /// Nudge the SalesOutbox; answers whether it is running.
    FlushOutboxNow(RpcReplyPort<Result<(), EngineError>>),
    /// Run a reconcile; the reply port is forwarded to the Reconciler.
    Reconcile(
        ReconcileAction,
        RpcReplyPort<Result<ReconcileReport, EngineError>>,
    ),
    /// Restart a failed actor (sent by the supervisor to itself, at once or after a delay).
    Restart(ActorKind),
}

/// Addresses of the running children (`None` while one is down).
#[derive(Default)]
struct Children {
    catalog: Option<ActorRef<CatalogMsg>>,
    outbox: Option<ActorRef<OutboxMsg>>,
    reconciler: Option<ActorRef<ReconcileMsg>>,
    backoff: Option<ActorCell>,
}

impl Children {
    fn kind_of(&self, cell: &ActorCell) -> Option<ActorKind> {
        let id = cell.get_id();
        if self.catalog.as_ref().is_some_and(|a| a.get_id() == id) {
            Some(ActorKind::CatalogSyncer)
        } else if self.outbox.as_ref().is_some_and(|a| a.get_id() == id) {
            Some(ActorKind::SalesOutbox)
        } else if self.reconciler.as_ref().is_some_and(|a| a.get_id() == id) {
            Some(ActorKind::Reconciler)
        } else if self.backoff.as_ref().is_some_and(|a| a.get_id() == id) {
            Some(ActorKind::Backoff)
        } else {
            None
        }
    }
}

/// How long shutdown waits for a child to finish its current message before killing it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// One child's failures in a row (monotonic time: a clock step must not reset or stretch them).
#[derive(Debug, Clone, Copy)]
struct RestartHistory {
    /// Failures since the child last ran for a whole `restart_window`.
    failures: u32,
    /// When the child was last (re)started, or a restart of it last attempted.
    started_at: Instant,
}

impl RestartHistory {
    /// A restart attempt begins a run whether or not the start succeeds: a start that fails at
    /// once is a run of zero length, so [`count_failure`] keeps counting instead of finding
    /// the last *successful* start an hour ago and starting the count (and delay) over.
    fn attempt(&mut self, now: Instant) {
        self.started_at = now;
    }
}

/// Supervisor state: the children, and each child's run of failures.
pub struct SupervisorState {
    ctx: Arc<SyncContext>,
    children: Children,
    restarts: HashMap<ActorKind, RestartHistory>,
}

/// The root of the engine's actor tree.
pub struct SyncSupervisor;

/// How long to wait before restarting an actor after its `failures`-th failure in a row
/// (≥ 1): nothing for the first, then `base · 2^(failures-2)`, capped at `cap`, computed
/// without overflow. Pure, so the rule is tested without actors.
pub fn restart_delay(failures: u32, base: Duration, cap: Duration) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    let exp = (failures - 2).min(63);
    let base_ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
    let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(base_ms.saturating_mul(1u64 << exp).min(cap_ms))
}

/// Counts one more failure of a child started at `history.started_at`: a child that ran for
/// `window` since then was healthy, so the run of failures starts over.
fn count_failure(history: &mut RestartHistory, now: Instant, window: Duration) -> u32 {
    if now.saturating_duration_since(history.started_at) >= window {
        history.failures = 0;
    }
    history.failures = history.failures.saturating_add(1);
    history.failures
}

impl SyncSupervisor {
    async fn start_child(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        kind: ActorKind,
    ) -> Result<(), ractor::SpawnErr> {
        let ctx = state.ctx.clone();
        let sup = myself.get_cell();
        match kind {
            ActorKind::Backoff => {
                let args = BackoffArgs {
                    policy: ctx.config.backoff,
                    seed: ctx.config.rng_seed,
                    clock: ctx.clock.clone(),
                    board: ctx.board.clone(),
                };
                let (a, _) = Actor::spawn_linked(None, Backoff, args, sup).await?;
                ctx.backoff.set(Some(a.clone()));
                state.children.backoff = Some(a.get_cell());
            }
            ActorKind::CatalogSyncer => {
                let (a, _) = Actor::spawn_linked(None, CatalogSyncer, ctx, sup).await?;
                state.children.catalog = Some(a);
            }
            ActorKind::SalesOutbox => {
                let (a, _) = Actor::spawn_linked(None, SalesOutbox, ctx, sup).await?;
                state.children.outbox = Some(a);
            }
            ActorKind::Reconciler => {
                let (a, _) = Actor::spawn_linked(None, Reconciler, ctx, sup).await?;
                state.children.reconciler = Some(a);
            }
        }
        Ok(())
    }

    fn forget(state: &mut SupervisorState, kind: ActorKind) {
        match kind {
            ActorKind::Backoff => {
                state.children.backoff = None;
                state.ctx.backoff.set(None);
            }
            ActorKind::CatalogSyncer => state.children.catalog = None,
            ActorKind::SalesOutbox => state.children.outbox = None,
            ActorKind::Reconciler => state.children.reconciler = None,
        }
    }

    /// A child failed (or its restart did not come up): restart it now or after the delay of
    /// its run of failures. Never gives up.
    fn schedule_restart(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        kind: ActorKind,
    ) -> Duration {
        let cfg = &state.ctx.config;
        let now = Instant::now();
        let history = state.restarts.entry(kind).or_insert(RestartHistory {
            failures: 0,
            started_at: now,
        });
        let failures = count_failure(history, now, cfg.restart_window);
        let delay = restart_delay(failures, cfg.restart_delay_base, cfg.restart_delay_cap);
        let at =
            state.ctx.now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero());
        state
            .ctx
            .board
            .set_state(kind, ActorState::Restarting { at, failures });
        if !delay.is_zero() {
            tracing::warn!(
                terminalId = %cfg.terminal_id, branchId = %cfg.branch_id, actor = kind.as_str(),
                failures, delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "actor keeps failing; restarting it after a delay"
            );
        }
        drop(myself.send_after(delay, move || SupervisorMsg::Restart(kind)));
        delay
    }

    async fn restart(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        kind: ActorKind,
    ) {
        // A stale timer (the child is already back) must not start a second instance.
        if Self::running(state, kind) {
            return;
        }
        let n = state.ctx.board.count_restart(kind);
        state
            .ctx
            .metrics
            .actor_restarts
            .with_label_values(&[kind.as_str()])
            .inc();
        let cfg = &state.ctx.config;
        tracing::warn!(
            terminalId = %cfg.terminal_id, branchId = %cfg.branch_id, actor = kind.as_str(),
            restarts = n, "restarting actor"
        );
        if let Some(h) = state.restarts.get_mut(&kind) {
            h.attempt(Instant::now());
        }
        match Self::start_child(myself, state, kind).await {
            Ok(()) => {}
            Err(e) => {
                state
                    .ctx
                    .board
                    .set_error(kind, format!("restart failed: {e}"));
                // A start that fails is one more failure in the run: paced the same way.
                Self::schedule_restart(myself, state, kind);
            }
        }
    }

    fn running(state: &SupervisorState, kind: ActorKind) -> bool {
        match kind {
            ActorKind::Backoff => state.children.backoff.is_some(),
            ActorKind::CatalogSyncer => state.children.catalog.is_some(),
            ActorKind::SalesOutbox => state.children.outbox.is_some(),
            ActorKind::Reconciler => state.children.reconciler.is_some(),
        }
    }
}

impl Actor for SyncSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = Arc<SyncContext>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        ctx: Arc<SyncContext>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = SupervisorState {
            ctx,
            children: Children::default(),
            restarts: HashMap::new(),
        };
        // Backoff first: the others ask it for delays from their first step on.
        for kind in ActorKind::ALL {
            Self::start_child(&myself, &mut state, kind).await?;
        }
        Ok(state)
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A child finishes the message it is handling (a page, a batch) before it stops; one
        // stuck in a long cloud call is killed after the grace period so shutdown always ends.
        myself
            .stop_children_and_wait(Some("engine shutdown".into()), Some(SHUTDOWN_GRACE))
            .await;
        for child in myself.get_children() {
            let _ = child.kill_and_wait(Some(SHUTDOWN_GRACE)).await;
        }
        for kind in ActorKind::ALL {
            state.ctx.board.set_state(kind, ActorState::Stopped);
        }
        state.ctx.backoff.set(None);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::SyncCatalogNow(reply) => {
                let r = match &state.children.catalog {
                    Some(a) => a
                        .cast(CatalogMsg::SyncNow)
                        .map_err(|_| EngineError::Unavailable("catalog_syncer")),
                    None => Err(EngineError::Unavailable("catalog_syncer")),
                };
                let _ = reply.send(r);
            }
            SupervisorMsg::FlushOutboxNow(reply) => {
                let r = match &state.children.outbox {
                    Some(a) => a
                        .cast(OutboxMsg::Pump)
                        .map_err(|_| EngineError::Unavailable("sales_outbox")),
                    None => Err(EngineError::Unavailable("sales_outbox")),
                };
                let _ = reply.send(r);
            }
            SupervisorMsg::Reconcile(action, reply) => match &state.children.reconciler {
                // The reply port travels on to the reconciler: the supervisor does not wait.
                Some(a) => {
                    if let Err(ractor::MessagingErr::SendErr(ReconcileMsg::Run { reply, .. })) =
                        a.cast(ReconcileMsg::Run { action, reply })
                    {
                        let _ = reply.send(Err(EngineError::Unavailable("reconciler")));
                    }
                }
                None => {
                    let _ = reply.send(Err(EngineError::Unavailable("reconciler")));
                }
            },
            SupervisorMsg::Restart(kind) => Self::restart(&myself, state, kind).await,
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(kind) = state.children.kind_of(&cell) else {
                    return Ok(());
                };
                let cfg = &state.ctx.config;
                tracing::error!(
                    terminalId = %cfg.terminal_id, branchId = %cfg.branch_id, actor = kind.as_str(),
                    errorCode = %crate::code::TerminalCode::ActorFailed, error = %err, "sync actor failed"
                );
                state.ctx.board.set_error(kind, err.to_string());
                Self::forget(state, kind);
                Self::schedule_restart(&myself, state, kind);
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(kind) = state.children.kind_of(&cell) {
                    tracing::info!(actor = kind.as_str(), ?reason, "sync actor stopped");
                    Self::forget(state, kind);
                    state.ctx.board.set_state(kind, ActorState::Stopped);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_in_a_row_wait_ever_longer_up_to_the_cap_and_never_stop() {
        let (base, cap) = (Duration::from_millis(100), Duration::from_secs(30));
        assert_eq!(
            restart_delay(1, base, cap),
            Duration::ZERO,
            "a one-off is instant"
        );
        assert_eq!(restart_delay(2, base, cap), Duration::from_millis(100));
        assert_eq!(restart_delay(3, base, cap), Duration::from_millis(200));
        assert_eq!(restart_delay(10, base, cap), Duration::from_millis(25_600));
        assert_eq!(restart_delay(11, base, cap), cap);
        assert_eq!(restart_delay(u32::MAX, base, cap), cap, "no overflow");
        assert_eq!(
            restart_delay(70, Duration::MAX, Duration::MAX),
            Duration::from_millis(u64::MAX)
        );
        let mut last = Duration::ZERO;
        for n in 1..200 {
            let d = restart_delay(n, base, cap);
            assert!(d >= last && d <= cap, "{n}: {d:?}");
            last = d;
        }
    }

    #[test]
    fn a_restart_that_fails_at_once_keeps_counting_after_a_long_healthy_run() {
        // Ran an hour, failed (1: restarted at once); each restart attempt is the start of a
        // run (`restart` calls `attempt` before `start_child`), so a start that fails at once
        // is failure 2, 3 … with a growing delay — not failure 1 again, as it was while only a
        // successful start moved `started_at`.
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        let (base, cap) = (Duration::from_millis(100), Duration::from_secs(30));
        let mut h = RestartHistory {
            failures: 0,
            started_at: t0,
        };
        let hour = t0 + Duration::from_secs(3600);
        assert_eq!(count_failure(&mut h, hour, w), 1);
        let mut delays = Vec::new();
        let mut at = hour;
        for _ in 0..4 {
            h.attempt(at);
            let n = count_failure(&mut h, at, w); // fails at once
            let d = restart_delay(n, base, cap);
            delays.push(d);
            at += d;
        }
        assert_eq!(
            delays,
            [100, 200, 400, 800].map(Duration::from_millis).to_vec()
        );
    }

    #[test]
    fn a_healthy_run_starts_the_count_over() {
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        let mut h = RestartHistory {
            failures: 0,
            started_at: t0,
        };
        assert_eq!(count_failure(&mut h, t0 + Duration::from_secs(1), w), 1);
        assert_eq!(count_failure(&mut h, t0 + Duration::from_secs(2), w), 2);
        h.started_at = t0 + Duration::from_secs(2);
        assert_eq!(count_failure(&mut h, t0 + Duration::from_secs(3), w), 3);
        // it then ran a whole window before failing again
        h.started_at = t0 + Duration::from_secs(3);
        assert_eq!(count_failure(&mut h, t0 + Duration::from_secs(63), w), 1);
    }
}
