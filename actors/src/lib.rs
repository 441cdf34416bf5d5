//! # possync-actors
//!
//! The terminal's sync engine: a supervisor and four `ractor` actors — `CatalogSyncer`,
//! `SalesOutbox`, `Reconciler`, `Backoff` — that own their state, reload it from the local
//! store when restarted, and talk to the world only through the interfaces in [`ports`].

pub mod ports;

pub use ports::*;
