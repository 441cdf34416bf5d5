//! # possync-actors
//!
//! The terminal's sync engine: a supervisor and four `ractor` actors — `CatalogSyncer`,
//! `SalesOutbox`, `Reconciler`, `Backoff` — that own their state, reload it from the local
//! store when restarted, and talk to the world only through the interfaces in [`ports`].
//!
//! The daemon uses [`Engine`]; the sync decisions are pure functions
//! ([`catalog::next_request`], [`outbox::outcomes_for`], [`backoff::next_delay`],
//! [`reconcile::cut_range`]) so tests and simulations can drive them without actors.

pub mod backoff;
pub mod catalog;
pub mod engine;
pub mod metrics;
pub mod outbox;
pub mod ports;
pub mod reconcile;
pub mod status;
pub mod supervisor;
#[cfg(feature = "testing")]
pub mod testing;

pub use backoff::{BackoffPolicy, Decision};
pub use engine::{Engine, EngineConfig, EngineError};
pub use ports::*;
pub use reconcile::{ReconcileAction, ReconcileReport};
pub use status::{ActorKind, ActorStatus, EngineStatus};
