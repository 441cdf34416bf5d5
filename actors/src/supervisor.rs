//! `SyncSupervisor`: starts the four sync actors, restarts any that fails (its state is reloaded
//! from the store by the new instance), and gives up on an actor that keeps failing.
//!
//! Restart intensity is bounded per actor (default: more than 10 restarts within 60 s and the
//! actor stays down, shown as `failed`), so a persistent fault — a corrupt database, say — shows
//! up on the status page instead of spinning.

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::collections::{HashMap, VecDeque};
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
    /// Retry starting an actor whose restart did not come up.
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

/// Supervisor state: the children, and each child's recent restart times.
pub struct SupervisorState {
    ctx: Arc<SyncContext>,
    children: Children,
    restarts: HashMap<ActorKind, VecDeque<Instant>>,
}

/// The root of the engine's actor tree.
pub struct SyncSupervisor;

/// Whether another restart fits the intensity budget: prunes restarts older than `window`,
/// then allows one if fewer than `max` remain. Pure, so the rule is tested without actors.
pub fn restart_allowed(
    history: &mut VecDeque<Instant>,
    now: Instant,
    max: u32,
    window: Duration,
) -> bool {
    while history
        .front()
        .is_some_and(|t| now.duration_since(*t) > window)
    {
        history.pop_front();
    }
    if history.len() >= max as usize {
        return false;
    }
    history.push_back(now);
    true
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

    async fn restart(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        kind: ActorKind,
    ) {
        let cfg = &state.ctx.config;
        let history = state.restarts.entry(kind).or_default();
        if !restart_allowed(
            history,
            Instant::now(),
            cfg.max_restarts,
            cfg.restart_window,
        ) {
            tracing::error!(
                terminalId = %cfg.terminal_id, branchId = %cfg.branch_id, actor = kind.as_str(),
                "actor failed too often; leaving it down"
            );
            state.ctx.board.set_state(kind, ActorState::Failed);
            return;
        }
        let n = state.ctx.board.count_restart(kind);
        state
            .ctx
            .metrics
            .actor_restarts
            .with_label_values(&[kind.as_str()])
            .inc();
        tracing::warn!(
            terminalId = %cfg.terminal_id, branchId = %cfg.branch_id, actor = kind.as_str(),
            restarts = n, "restarting actor"
        );
        if let Err(e) = Self::start_child(myself, state, kind).await {
            state
                .ctx
                .board
                .set_error(kind, format!("restart failed: {e}"));
            // Try again shortly; the intensity budget bounds how often.
            drop(myself.send_after(Duration::from_millis(100), move || {
                SupervisorMsg::Restart(kind)
            }));
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
                Self::restart(&myself, state, kind).await;
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
    fn intensity_allows_max_restarts_per_window_then_refuses() {
        let mut h = VecDeque::new();
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        for i in 0..3 {
            assert!(restart_allowed(&mut h, t0 + Duration::from_secs(i), 3, w));
        }
        assert!(!restart_allowed(&mut h, t0 + Duration::from_secs(10), 3, w));
        // once the oldest restarts age out of the window, restarts are allowed again
        assert!(restart_allowed(&mut h, t0 + Duration::from_secs(62), 3, w));
    }
}
