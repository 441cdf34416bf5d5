//! # possync-terminal
//!
//! The POS daemon: local SQLite store, the sync engine's production ports, the loopback
//! API and the `terminal` command line.
//!
//! - [`data_dir`]: the data directory's permissions and the local API token.
//! - [`store`]: the rusqlite store (sync tables, outbox, legacy migration).
//! - [`cloud_client`]: the HTTP implementation of the engine's `CloudApi`.
//! - [`carry_over`]: moving unsent sales to a new key space (re-enrollment, clone, restore).
//! - [`operator`]: what the status endpoint and CLI need from the till and the engine.
//! - [`local_api`]: the daemon's loopback API — `/status` and its HTML page, `POST /sales`
//!   for the checkout, the outbox and reconcile commands — and who may call it.
//! - [`wiring`]: the operator ports implemented over the store and the engine.
//! - [`daemon`], [`cli`], [`logging`]: `terminal run` and the other commands;
//!   [`first_sync`]: the snapshot's progress bar (TTY) or progress log lines.

#![warn(missing_docs)]

pub mod carry_over;
pub mod cli;
pub mod cloud_client;
pub mod daemon;
pub mod data_dir;
pub mod first_sync;
pub mod local_api;
pub mod logging;
pub mod operator;
pub mod store;
pub mod wiring;
