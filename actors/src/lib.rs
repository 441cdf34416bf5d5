//! # possync-actors
//!
//! The terminal's sync engine: a supervisor and four `ractor` actors — `CatalogSyncer`,
//! `SalesOutbox`, `Reconciler`, `Backoff` — that own their state, reload it from the local
//! store when restarted, and talk to the world only through the interfaces in [`ports`].
//!
//! The daemon uses [`Engine`]; the sync decisions are pure functions
//! ([`catalog::next_request`], [`outbox::outcomes_for`], [`backoff::next_delay`],
//! [`reconcile::cut_range`]) so tests and simulations can drive them without actors.
//!
//! ## Decisions where the contract is silent
//!
//! - **Attempts.** A failed delivery is classed once ([`ports::FailureClass`]): *no answer*
//!   (unreachable, timeout, reset, a cut or foreign body, a proxy's 502/503/504 without our
//!   envelope, 408, 429), *the cloud's own error* (5xx with an envelope), or a *refusal*.
//!   `BackoffPolicy::max_attempts` counts only failures pinned on the sale itself
//!   ([`outbox::blame_sale`]: the cloud's own error, the sale sent alone, and the cloud stored
//!   other sales since the sale's previous failure). Only those end in `needs_attention` with
//!   the terminal-local code [`TerminalCode::AttemptsExhausted`]; an outage of any length never
//!   does. Every failure paces the next try: the delay after the n-th failure is
//!   `rand(0 ..= min(cap, base·2^(n-1)))`, never less than `Retry-After`.
//! - **Outage hold.** After a failure that is the cloud's trouble the outbox sends no sale;
//!   it asks `CloudApi::probe` (`GET /readyz`) at the backoff cadence of the outage, and any
//!   answer from the cloud (a probe, or another actor's call) lifts the hold. So the queue
//!   starts draining at most one backoff cap (or a longer `Retry-After`) after the cloud
//!   returns, however long it was away.
//! - **Whole-request refusals** that retrying cannot fix (400, 403, 413 … *with the cloud's
//!   error envelope*) put every sale of the batch into `needs_attention` with the cloud's code.
//!   The same statuses without the envelope are a proxy's page (a WAF, a CDN, nginx mid-deploy):
//!   no answer, held and retried, never parked. A 401 is a credentials refusal: the sales wait,
//!   unparked, for new credentials. An answer with the wrong number of
//!   results (or results for other events) is not trusted and counts as a transient failure
//!   (`BAD_RESPONSE`): resending is safe because the cloud's ledger is idempotent.
//! - **Request size.** A claimed batch is split so that each request stays under the cloud's
//!   1 MiB / 500-event limits; a single larger sale goes alone (and is refused with 413).
//! - **Catalog errors** never give up: transient ones back off up to the cap and keep trying;
//!   410 (or `resnapshot_required`), and a 400 on a stored snapshot cursor, start a fresh
//!   snapshot.
//! - **Reconcile** ranges hold at most `reconcile_range_entries` entries; on 413 the range is
//!   halved and retried (the error carries no `details.max_entries` through `CloudError`, so
//!   halving finds the limit in log2 steps). Transient errors are retried three times within a
//!   run unless the wait would exceed 15 s; then the run fails with the cloud's code.
//! - **Supervision.** A child that fails (error or panic, including a store panic) is restarted
//!   with its state reloaded from the store, and never given up on: the first failure at
//!   once, each further one in a row after twice the previous delay (`restart_delay_base`
//!   100 ms up to `restart_delay_cap` 30 s; a run of `restart_window` 60 s starts the count
//!   over), shown as `restarting` in [`EngineStatus`] meanwhile. Store failures are not
//!   retried in place: they fail the actor, so the restart re-reads the store.
//! - **Status states** are [`ActorState`] values (their lines and stable `phase` names are
//!   listed in `docs/terminal-operations.md`); codes are [`TerminalCode`] values.

#![warn(missing_docs)]

pub mod backoff;
pub mod catalog;
#[cfg(feature = "testing")]
pub mod cloud_contract;
pub mod code;
pub mod context;
pub mod engine;
pub mod metrics;
pub mod outbox;
pub mod ports;
pub mod reconcile;
pub mod status;
#[cfg(feature = "testing")]
pub mod store_contract;
pub mod supervisor;
#[cfg(feature = "testing")]
pub mod testing;

pub use backoff::{BackoffPolicy, Decision};
pub use code::TerminalCode;
pub use engine::{Engine, EngineConfig, EngineError};
pub use ports::*;
pub use reconcile::{ReconcileAction, ReconcileReport};
pub use status::{ActorKind, ActorState, ActorStatus, EngineStatus};
