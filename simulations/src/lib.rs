#![warn(missing_docs)]
//! # possync-simulations
//!
//! Proves, by running it, that many terminals of many branches selling at once through an
//! unreliable network get every sale into the cloud exactly once, with nothing crossing a
//! branch, and that every terminal's catalog converges on its branch's truth.
//!
//! A run starts real `cloud serve` processes on a fresh PostgreSQL database and real
//! `terminal run` daemons (the production binaries, found next to this one), puts a
//! [`proxy::FaultProxy`] between each terminal and the cloud, and injects the faults of a
//! [`fault_schedule::FaultSchedule`] derived from one seed. At the end it compares every
//! terminal's journal with the cloud's ledger row by row ([`ledger_audit`]) and writes a
//! [`report::RunReport`].

pub mod catalog_churn;
pub mod cloud_cluster;
pub mod daemon;
pub mod fault_schedule;
pub mod ledger_audit;
pub mod load;
pub mod proxy;
pub mod report;
pub mod sale_script;
pub mod scenario;
pub mod terminal_fleet;

use thiserror::Error;

/// Why a run could not be carried out (as opposed to a run that found a defect, which is a
/// report with non-zero `lost`/`duplicated`/... and a failing exit status).
#[derive(Debug, Error)]
pub enum SimError {
    /// PostgreSQL is not reachable or refused a statement.
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// A binary (`cloud`, `terminal`) is missing next to `simulations`.
    #[error("binary not found: {0} (run `cargo build --workspace --bins` first)")]
    MissingBinary(String),
    /// A child process failed to start, or did not announce its address.
    #[error("process `{name}`: {message}")]
    Process {
        /// Which process (`cloud-0`, `terminal-3`).
        name: String,
        /// What went wrong.
        message: String,
    },
    /// A command-line tool answered with a failure.
    #[error("`{command}` failed: {message}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status and stderr.
        message: String,
    },
    /// An HTTP call of the harness itself failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// Local files, sockets or a terminal's SQLite database.
    #[error("I/O: {0}")]
    Io(String),
    /// A phase did not finish before its deadline.
    #[error("timed out: {0}")]
    Timeout(String),
}
