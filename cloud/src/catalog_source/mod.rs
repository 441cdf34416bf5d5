//! A catalog fed straight from the back office's own PostgreSQL tables (docs/catalog-source.md).
//!
//! A mapping file ([`mapping`]) says which table feeds which entity type. [`inspect`] checks it
//! against the database (`cloud catalog source check`). [`capture`] installs statement-level
//! triggers on the mapped tables that stage every change of a transaction, plus one deferred
//! trigger that writes the staged changes into `catalog_entities` **at commit**, under the
//! same `catalog_counter` row lock and version rule as admin writes
//! (`db::catalog::upsert_entities`). [`load`] copies what the tables already hold, in batches,
//! through that same path.
//!
//! # Why every committed change gets a version in commit order, and nothing else does
//!
//! The triggers only stage rows (`possync_source_changes`, keyed by the transaction id); the
//! deferred trigger runs as the last step of the writing transaction's commit, takes the
//! counter's row lock, numbers the transaction's final state of each key above the counter
//! and raises it. The lock is held until the commit completes, so versions are handed out in
//! commit order — exactly the invariant `db::catalog` relies on (a delta cursor at `V` can
//! never skip a change that commits later). A transaction that rolls back (or a savepoint
//! rolled back to) takes its staged rows and its pending flush with it: nothing of it is ever
//! numbered. Holding the lock only for the commit's last step, not for the back office's whole
//! transaction, keeps admin writes and other writers from waiting on a slow back-office
//! transaction and cannot deadlock with the back office's own row locks.
//!
//! # Why the hash the trigger stores is the hash the terminal computes
//!
//! The document is built in SQL as canonical JSON text: keys sorted bytewise (they are known
//! when the trigger is generated, so Rust sorts them), no whitespace, strings through
//! PostgreSQL's `to_json` (which escapes exactly the characters serde_json escapes, in the
//! same form), integers and booleans as their literals. Only column types whose JSON form is
//! unambiguous are accepted ([`inspect::ColumnKind`]); floats, numerics and JSON columns are
//! refused at `check` because their text forms differ between PostgreSQL and serde_json. The
//! hash is `sha256` of that text, and a test compares it with `possync_protocol::entity_hash`
//! of the parsed document over hostile strings.

pub mod capture;
pub mod inspect;
pub mod load;
pub mod mapping;

use std::fmt;

use thiserror::Error;

use crate::db::StoreError;

pub use inspect::{CheckedEntity, CheckedSource};
pub use mapping::SourceMapping;

/// A stable code for one problem `check` finds (printed as the first word of its line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemCode {
    /// The table does not exist (or is not a plain table).
    NoTable,
    /// A mapped column does not exist.
    NoColumn,
    /// A column's type cannot be carried into a catalog document exactly.
    UnsupportedType,
    /// The id columns are not the table's primary key.
    IdNotPrimaryKey,
    /// The database does not store text as UTF-8.
    NotUtf8,
}

impl ProblemCode {
    /// The code as printed.
    pub const fn as_str(self) -> &'static str {
        match self {
            ProblemCode::NoTable => "POS_SOURCE_NO_TABLE",
            ProblemCode::NoColumn => "POS_SOURCE_NO_COLUMN",
            ProblemCode::UnsupportedType => "POS_SOURCE_UNSUPPORTED_TYPE",
            ProblemCode::IdNotPrimaryKey => "POS_SOURCE_ID_NOT_PRIMARY_KEY",
            ProblemCode::NotUtf8 => "POS_SOURCE_NOT_UTF8",
        }
    }
}

/// One problem of a mapping against a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What kind of problem.
    pub code: ProblemCode,
    /// The entity type it concerns (empty for database-wide problems).
    pub entity_type: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.code.as_str(),
            if self.entity_type.is_empty() {
                "-"
            } else {
                &self.entity_type
            },
            self.message
        )
    }
}

/// Failures of the catalog-source boundary, each printed with its stable code.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The mapping file cannot be read or is malformed.
    #[error("POS_SOURCE_CONFIG: {path}: {message}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The cloud runs on the embedded SQLite database.
    #[error(
        "POS_SOURCE_NEEDS_POSTGRES: a catalog source needs the PostgreSQL cloud (its triggers \
         live in the back office's database); the embedded SQLite cloud takes its catalog from \
         `cloud catalog import` and the admin routes"
    )]
    NeedsPostgres,
    /// `check` found problems (each printed on its own line before this).
    #[error(
        "POS_SOURCE_CHECK_FAILED: {} problem(s) in the mapping: {}",
        .0.len(),
        .0.iter().map(Problem::to_string).collect::<Vec<_>>().join("; ")
    )]
    Problems(Vec<Problem>),
    /// The triggers of the mapping are missing or were generated from another mapping.
    #[error("POS_SOURCE_NOT_INSTALLED: {0}; run `cloud catalog source install PATH`")]
    NotInstalled(String),
    /// The back office holds a value the catalog cannot take (e.g. an id with spaces).
    #[error("POS_SOURCE_BAD_ROW: {0}")]
    BadRow(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<diesel::result::Error> for SourceError {
    fn from(e: diesel::result::Error) -> Self {
        match &e {
            // The capture and flush triggers refuse a row the catalog cannot hold with
            // check_violation and a message naming it.
            diesel::result::Error::DatabaseError(_, info)
                if info.message().starts_with("possync catalog source:") =>
            {
                SourceError::BadRow(info.message().to_string())
            }
            _ => SourceError::Store(StoreError::from(e)),
        }
    }
}
