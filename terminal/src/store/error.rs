//! The store's one error type, mapped once onto the stable codes of the contract.

use possync_actors::StoreError;
use possync_protocol::{ErrorCode, SaleInvalid};
use thiserror::Error;

/// Why a store operation failed. Validation failures are the caller's to fix
/// (`POS_SYNC_EVENT_INVALID`); everything else is a local storage failure
/// (`POS_SYNC_STORAGE_FAILED`) after which nothing of the operation was written.
#[derive(Debug, Error)]
pub enum TerminalStoreError {
    /// The sale failed the shared protocol validation; nothing was stored.
    #[error("sale is invalid: {0}")]
    Invalid(#[from] SaleInvalid),
    /// SQLite refused or failed the statement; the transaction rolled back.
    #[error("local database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A numbered schema migration failed; the database stays at the previous version.
    #[error("schema migration {version} ({name}) failed: {source}")]
    Migration {
        /// The migration's number.
        version: u32,
        /// The migration's name.
        name: &'static str,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The safety copy taken before migrating could not be written; nothing was migrated.
    #[error("backup to {path} failed: {source}")]
    Backup {
        /// Where the copy was to go.
        path: String,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer build than this one.
    #[error("database schema version {found} is newer than this build knows ({known})")]
    TooNew {
        /// The file's schema version.
        found: u32,
        /// The newest version this build knows.
        known: u32,
    },
    /// A stored value does not have the shape this build wrote.
    #[error("local data is inconsistent: {0}")]
    Corrupt(String),
    /// The enrollment names an identity the cloud could never accept (e.g. a malformed
    /// branch id); nothing was saved. Mapped to `POS_SYNC_UNAUTHORIZED`.
    #[error("enrollment refused: {0}")]
    InvalidEnrollment(String),
    /// The operation needs an enrolled terminal.
    #[error("terminal is not enrolled")]
    NotEnrolled,
    /// `POST /sales`: the idempotency key already recorded a different sale request; nothing
    /// was stored. Mapped to `POS_LOCAL_IDEMPOTENCY_KEY_REUSED`.
    #[error(
        "Idempotency-Key {key:?} already recorded another sale request \
         (local_event_id {local_event_id} of pos_id {pos_id}); send a new key for a new sale"
    )]
    IdempotencyKeyReused {
        /// The key.
        key: String,
        /// The `pos_id` of the sale it recorded.
        pos_id: uuid::Uuid,
        /// That sale's `local_event_id`.
        local_event_id: i64,
    },
    /// `migrate_legacy` was pointed at a file that is not a database, or a missing one.
    #[error("{0}")]
    NotADatabase(String),
}

impl TerminalStoreError {
    /// The stable code a CLI line, HTTP answer or log carries for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            TerminalStoreError::Invalid(_) => ErrorCode::PosSyncEventInvalid,
            // Whatever layer reports it, a till without a usable identity is "unauthorized".
            TerminalStoreError::InvalidEnrollment(_) | TerminalStoreError::NotEnrolled => {
                ErrorCode::PosSyncUnauthorized
            }
            TerminalStoreError::IdempotencyKeyReused { .. } => {
                ErrorCode::PosLocalIdempotencyKeyReused
            }
            _ => ErrorCode::PosSyncStorageFailed,
        }
    }
}

impl From<serde_json::Error> for TerminalStoreError {
    fn from(e: serde_json::Error) -> Self {
        TerminalStoreError::Corrupt(format!("JSON: {e}"))
    }
}

impl From<TerminalStoreError> for StoreError {
    fn from(e: TerminalStoreError) -> Self {
        match e {
            TerminalStoreError::Corrupt(m) => StoreError::Corrupt(m),
            other => StoreError::Database(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_maps_to_event_invalid_and_the_rest_to_storage_failed() {
        let invalid = TerminalStoreError::Invalid(SaleInvalid::Arithmetic("x".into()));
        assert_eq!(invalid.code(), ErrorCode::PosSyncEventInvalid);
        let db = TerminalStoreError::Sqlite(rusqlite::Error::QueryReturnedNoRows);
        assert_eq!(db.code(), ErrorCode::PosSyncStorageFailed);
        assert_eq!(
            TerminalStoreError::Corrupt("x".into()).code(),
            ErrorCode::PosSyncStorageFailed
        );
        assert_eq!(
            TerminalStoreError::NotEnrolled.code(),
            ErrorCode::PosSyncUnauthorized
        );
        let reused = TerminalStoreError::IdempotencyKeyReused {
            key: "k".into(),
            pos_id: uuid::Uuid::nil(),
            local_event_id: 1,
        };
        assert_eq!(reused.code(), ErrorCode::PosLocalIdempotencyKeyReused);
        assert!(matches!(
            StoreError::from(TerminalStoreError::Corrupt("bad".into())),
            StoreError::Corrupt(m) if m == "bad"
        ));
    }
}
