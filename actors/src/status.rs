//! The engine's status board: what each actor is doing, how often it was restarted, whether the
//! cloud is reachable, and the latest catalog position and outbox counts.
//!
//! Actors write it as they work and `Engine::status()` reads it, so rendering `/status` never
//! waits on an actor that is busy with a long page or is being restarted.

use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::ports::{CatalogPosition, OutboxCounts};

/// The four supervised children, named for what they do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    /// Pulls the catalog (snapshot, then deltas).
    CatalogSyncer,
    /// Delivers the sales journal.
    SalesOutbox,
    /// Verifies and repairs the local catalog on request.
    Reconciler,
    /// Paces retries and tracks reachability.
    Backoff,
}

impl ActorKind {
    /// Every child, in start order (Backoff first: the others ask it for delays).
    pub const ALL: [ActorKind; 4] = [
        ActorKind::Backoff,
        ActorKind::CatalogSyncer,
        ActorKind::SalesOutbox,
        ActorKind::Reconciler,
    ];

    /// Name used in status, metrics labels and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            ActorKind::CatalogSyncer => "catalog_syncer",
            ActorKind::SalesOutbox => "sales_outbox",
            ActorKind::Reconciler => "reconciler",
            ActorKind::Backoff => "backoff",
        }
    }
}

/// One actor's line on the status page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ActorStatus {
    /// Human-readable state, e.g. `snapshotting 3000/100000`, `idle`, `backing_off until …`,
    /// `offline`, `failed`.
    pub state: String,
    /// Times the supervisor restarted this actor since the engine started.
    pub restarts: u32,
    /// The last error the actor hit (kept after recovery so an operator sees what happened).
    pub last_error: Option<String>,
}

/// Snapshot of the whole engine, as `/status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EngineStatus {
    /// Each supervised actor's line, keyed by its snake_case name.
    pub actors: BTreeMap<ActorKind, ActorStatus>,
    /// Whether the last call to the cloud got an answer (any HTTP answer counts).
    pub online: bool,
    /// When the cloud last answered.
    pub last_contact_at: Option<DateTime<Utc>>,
    /// Since when the cloud has not answered (the first unanswered call after the last
    /// answer); `None` while online.
    pub offline_since: Option<DateTime<Utc>>,
    /// Catalog position, snapshot progress included.
    pub catalog: CatalogPosition,
    /// Outbox rows by state and the oldest undelivered sale.
    pub outbox: OutboxCounts,
    /// The last catalog verify (on demand or scheduled), if any ran since start.
    pub last_verify: Option<VerifyOutcome>,
}

/// What the last verify found and cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyOutcome {
    /// When it finished.
    pub at: DateTime<Utc>,
    /// Whether the schedule started it (not an operator).
    pub scheduled: bool,
    /// Entities different from the cloud (upserts + deletes); `None` if it failed.
    pub drift_entities: Option<i64>,
    /// Round trips it made.
    pub round_trips: u64,
    /// HTTP body bytes sent and received.
    pub bytes: u64,
    /// Its error, when it failed.
    pub error: Option<String>,
}

/// Shared, cheaply clonable handle to the status board.
#[derive(Debug, Clone, Default)]
pub struct SharedBoard(Arc<RwLock<EngineStatus>>);

impl SharedBoard {
    /// A board listing every actor as `starting`.
    pub fn new() -> Self {
        let board = SharedBoard::default();
        board.write(|s| {
            for kind in ActorKind::ALL {
                s.actors.insert(
                    kind,
                    ActorStatus {
                        state: "starting".into(),
                        ..ActorStatus::default()
                    },
                );
            }
        });
        board
    }

    fn write(&self, f: impl FnOnce(&mut EngineStatus)) {
        // A writer that panicked mid-update leaves plain data behind; keep using it.
        let mut guard = self.0.write().unwrap_or_else(|e| e.into_inner());
        f(&mut guard);
    }

    /// A copy of the current status.
    pub fn snapshot(&self) -> EngineStatus {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The catalog position (without copying the whole board).
    pub fn catalog(&self) -> CatalogPosition {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .catalog
            .clone()
    }

    /// When the cloud last answered (without copying the whole board).
    pub fn last_contact_at(&self) -> Option<DateTime<Utc>> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .last_contact_at
    }

    /// Sets an actor's state line.
    pub fn set_state(&self, kind: ActorKind, state: impl Into<String>) {
        let state = state.into();
        self.write(|s| s.actors.entry(kind).or_default().state = state);
    }

    /// Records an actor's latest error.
    pub fn set_error(&self, kind: ActorKind, error: impl Into<String>) {
        let error = error.into();
        self.write(|s| s.actors.entry(kind).or_default().last_error = Some(error));
    }

    /// Counts one restart of `kind`; returns the new count.
    pub fn count_restart(&self, kind: ActorKind) -> u32 {
        let mut n = 0;
        self.write(|s| {
            let a = s.actors.entry(kind).or_default();
            a.restarts = a.restarts.saturating_add(1);
            n = a.restarts;
        });
        n
    }

    /// Records the outcome of a call to the cloud.
    pub fn set_contact(&self, reachable: bool, at: DateTime<Utc>) {
        self.write(|s| {
            s.online = reachable;
            if reachable {
                s.last_contact_at = Some(at);
                s.offline_since = None;
            } else if s.offline_since.is_none() {
                s.offline_since = Some(at);
            }
        });
    }

    /// Stores the latest catalog position.
    pub fn set_catalog(&self, position: CatalogPosition) {
        self.write(|s| s.catalog = position);
    }

    /// Records a finished verify.
    pub fn set_verify(&self, outcome: VerifyOutcome) {
        self.write(|s| s.last_verify = Some(outcome));
    }

    /// Stores the latest outbox counts.
    pub fn set_outbox(&self, counts: OutboxCounts) {
        self.write(|s| s.outbox = counts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn board_serializes_with_snake_case_actor_names() {
        let board = SharedBoard::new();
        board.set_state(ActorKind::CatalogSyncer, "idle");
        assert_eq!(board.count_restart(ActorKind::SalesOutbox), 1);
        let v = serde_json::to_value(board.snapshot()).expect("serialize");
        assert_eq!(v["actors"]["catalog_syncer"]["state"], "idle");
        assert_eq!(v["actors"]["sales_outbox"]["restarts"], 1);
        assert_eq!(v["online"], false);
    }
}
