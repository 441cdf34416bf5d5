//! The engine's status board: what each actor is doing, how often it was restarted, whether the
//! cloud is reachable, and the latest catalog position and outbox counts.
//!
//! Actors write it as they work and `Engine::status()` reads it, so rendering `/status` never
//! waits on an actor that is busy with a long page or is being restarted.

use chrono::SecondsFormat;
use chrono::{DateTime, Utc};
use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
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

/// What one supervised actor is doing, as the status page and `/status` show it.
///
/// The `Display` form is the page's state line (e.g. `snapshotting 3000/100000`,
/// `holding: cloud away, next probe at 2026-11-29T10:00:00Z`); [`ActorState::phase`] is its
/// stable snake_case name for tools and tests. Both are documented in
/// `docs/terminal-operations.md`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ActorState {
    /// Spawned (or being restarted), not yet working.
    #[default]
    Starting,
    /// Backoff: serving delay and reachability questions.
    Ready,
    /// Nothing to do until the next timer or nudge.
    Idle,
    /// CatalogSyncer: a snapshot is being taken, `received` of `total` entities so far.
    Snapshotting {
        /// Entities stored so far.
        received: i64,
        /// Entities in the snapshot (the cloud's count).
        total: i64,
    },
    /// CatalogSyncer: the cloud answered with an error; next try at `until`.
    BackingOff {
        /// When the next try is due.
        until: DateTime<Utc>,
    },
    /// CatalogSyncer: the cloud did not answer; next try at `until`.
    Offline {
        /// When the next try is due.
        until: DateTime<Utc>,
    },
    /// SalesOutbox: batches are on their way to the cloud.
    Sending {
        /// Batches in flight.
        batches: usize,
    },
    /// SalesOutbox: sales wait for their backoff to pass.
    Waiting {
        /// When the earliest one is due.
        next_retry_at: DateTime<Utc>,
    },
    /// SalesOutbox: the cloud is away; no sale is sent, the cloud is probed instead.
    Holding {
        /// When the next probe goes out.
        next_probe_at: DateTime<Utc>,
    },
    /// Reconciler: hashing the local catalog into its fingerprint tree.
    Fingerprinting,
    /// Reconciler: comparing fingerprints with the cloud, tree level `level`.
    ComparingFingerprints {
        /// Tree level being compared (1 = the root's children).
        level: u8,
    },
    /// Reconciler: one group of differing leaves (or one key range, for the manifest
    /// method) is being verified or repaired.
    Reconciling {
        /// Verify or apply.
        apply: bool,
        /// Whether the unit is a group of fingerprint leaves (else a key range).
        leaves: bool,
        /// The group's or range's number in this run, from 1.
        number: usize,
    },
    /// Reconciler: idle after a run that finished.
    Reconciled {
        /// Verify or apply.
        apply: bool,
        /// Entities the cloud had that differed or were missing.
        upserts: i64,
        /// Entities the cloud no longer has.
        deletes: i64,
    },
    /// Reconciler: idle after a run that failed (the error is in `last_error`).
    ReconcileFailed,
    /// Stopped by the supervisor (shutdown).
    Stopped,
    /// Failed and down until the supervisor restarts it at `at` (the error is in
    /// `last_error`). Failures in a row are restarted ever more slowly, never given up on.
    Restarting {
        /// When the restart is due (clock time, for the page).
        at: DateTime<Utc>,
        /// Failures in a row without a healthy run in between.
        failures: u32,
    },
}

impl ActorState {
    /// The state's stable snake_case name.
    pub const fn phase(&self) -> &'static str {
        match self {
            ActorState::Starting => "starting",
            ActorState::Ready => "ready",
            ActorState::Idle => "idle",
            ActorState::Snapshotting { .. } => "snapshotting",
            ActorState::BackingOff { .. } => "backing_off",
            ActorState::Offline { .. } => "offline",
            ActorState::Sending { .. } => "sending",
            ActorState::Waiting { .. } => "waiting",
            ActorState::Holding { .. } => "holding",
            ActorState::Fingerprinting => "fingerprinting",
            ActorState::ComparingFingerprints { .. } => "comparing_fingerprints",
            ActorState::Reconciling { apply: false, .. } => "verifying",
            ActorState::Reconciling { apply: true, .. } => "applying",
            ActorState::Reconciled { .. } => "reconciled",
            ActorState::ReconcileFailed => "reconcile_failed",
            ActorState::Stopped => "stopped",
            ActorState::Restarting { .. } => "restarting",
        }
    }
}

fn instant(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl fmt::Display for ActorState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActorState::Snapshotting { received, total } => {
                write!(f, "snapshotting {received}/{total}")
            }
            ActorState::BackingOff { until } => write!(f, "backing_off until {}", instant(until)),
            ActorState::Offline { until } => {
                write!(f, "offline, retrying until {}", instant(until))
            }
            ActorState::Sending { batches } => write!(f, "sending ({batches} batches in flight)"),
            ActorState::Waiting { next_retry_at } => {
                write!(f, "waiting (next retry at {})", instant(next_retry_at))
            }
            ActorState::Holding { next_probe_at } => write!(
                f,
                "holding: cloud away, next probe at {}",
                instant(next_probe_at)
            ),
            ActorState::Fingerprinting => f.write_str("fingerprinting the local catalog"),
            ActorState::ComparingFingerprints { level } => {
                write!(f, "comparing fingerprints (level {level})")
            }
            ActorState::Reconciling {
                apply,
                leaves,
                number,
            } => write!(
                f,
                "{} {} {number}",
                if *apply { "applying" } else { "verifying" },
                if *leaves { "leaves, group" } else { "range" }
            ),
            ActorState::Reconciled {
                apply,
                upserts,
                deletes,
            } => write!(
                f,
                "idle (last {}: {upserts} upserts, {deletes} deletes)",
                if *apply { "apply" } else { "verify" }
            ),
            ActorState::ReconcileFailed => f.write_str("idle (last run failed)"),
            ActorState::Restarting { at, failures } => write!(
                f,
                "restarting at {} (failed {failures} times in a row)",
                instant(at)
            ),
            other => f.write_str(other.phase()),
        }
    }
}

/// One actor's line on the status page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActorStatus {
    /// What it is doing.
    pub state: ActorState,
    /// Times the supervisor restarted this actor since the engine started.
    pub restarts: u32,
    /// The last error the actor hit (kept after recovery so an operator sees what happened).
    pub last_error: Option<String>,
}

/// `{"state": "<line>", "phase": "<name>", "restarts": n, "last_error": …}`.
impl Serialize for ActorStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_struct("ActorStatus", 4)?;
        m.serialize_field("state", &self.state.to_string())?;
        m.serialize_field("phase", self.state.phase())?;
        m.serialize_field("restarts", &self.restarts)?;
        m.serialize_field("last_error", &self.last_error)?;
        m.end()
    }
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
    /// Answers from the cloud counted since start: the outbox's hold asks "did the cloud
    /// answer since?" with this count, never with `last_contact_at`, which a wall clock
    /// stepped back would push behind the hold's start.
    #[serde(skip)]
    pub contacts: u64,
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
                        state: ActorState::Starting,
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

    /// How many answers from the cloud were reported so far (see [`EngineStatus::contacts`]).
    pub fn contacts(&self) -> u64 {
        self.0.read().unwrap_or_else(|e| e.into_inner()).contacts
    }

    /// When the cloud last answered (wall clock: for display).
    pub fn last_contact_at(&self) -> Option<DateTime<Utc>> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .last_contact_at
    }

    /// Sets what an actor is doing.
    pub fn set_state(&self, kind: ActorKind, state: ActorState) {
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
                s.contacts = s.contacts.wrapping_add(1);
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
    use chrono::TimeZone;

    #[test]
    fn state_lines_read_as_documented() {
        let t = Utc
            .with_ymd_and_hms(2026, 11, 29, 10, 0, 0)
            .single()
            .expect("time");
        let cases = [
            (
                ActorState::Snapshotting {
                    received: 3000,
                    total: 100000,
                },
                "snapshotting 3000/100000",
                "snapshotting",
            ),
            (
                ActorState::BackingOff { until: t },
                "backing_off until 2026-11-29T10:00:00Z",
                "backing_off",
            ),
            (
                ActorState::Offline { until: t },
                "offline, retrying until 2026-11-29T10:00:00Z",
                "offline",
            ),
            (
                ActorState::Holding { next_probe_at: t },
                "holding: cloud away, next probe at 2026-11-29T10:00:00Z",
                "holding",
            ),
            (
                ActorState::Sending { batches: 2 },
                "sending (2 batches in flight)",
                "sending",
            ),
            (
                ActorState::Reconciling {
                    apply: false,
                    leaves: true,
                    number: 3,
                },
                "verifying leaves, group 3",
                "verifying",
            ),
            (
                ActorState::Reconciling {
                    apply: true,
                    leaves: false,
                    number: 1,
                },
                "applying range 1",
                "applying",
            ),
            (
                ActorState::Reconciled {
                    apply: false,
                    upserts: 2,
                    deletes: 1,
                },
                "idle (last verify: 2 upserts, 1 deletes)",
                "reconciled",
            ),
            (
                ActorState::ReconcileFailed,
                "idle (last run failed)",
                "reconcile_failed",
            ),
            (ActorState::Ready, "ready", "ready"),
        ];
        for (state, line, phase) in cases {
            assert_eq!(state.to_string(), line);
            assert_eq!(state.phase(), phase);
        }
    }

    #[test]
    fn board_serializes_with_snake_case_actor_names() {
        let board = SharedBoard::new();
        board.set_state(ActorKind::CatalogSyncer, ActorState::Idle);
        assert_eq!(board.count_restart(ActorKind::SalesOutbox), 1);
        let v = serde_json::to_value(board.snapshot()).expect("serialize");
        assert_eq!(v["actors"]["catalog_syncer"]["state"], "idle");
        assert_eq!(v["actors"]["catalog_syncer"]["phase"], "idle");
        assert_eq!(v["actors"]["backoff"]["phase"], "starting");
        assert_eq!(v["actors"]["sales_outbox"]["restarts"], 1);
        assert_eq!(v["online"], false);
    }
}
