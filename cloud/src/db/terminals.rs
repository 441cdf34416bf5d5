//! Enrolled terminals and their bearer tokens.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{DbConn, StoreError};

/// Who a valid token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminalIdentity {
    pub terminal_id: Uuid,
    pub branch_id: String,
}

/// A newly enrolled terminal with its token, shown once.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedTerminal {
    pub terminal_id: Uuid,
    pub branch_id: String,
    pub token: String,
}

/// A terminal as admin views list it (no token material).
#[derive(Debug, Clone, Serialize)]
pub struct TerminalRecord {
    pub terminal_id: Uuid,
    pub branch_id: String,
    pub name: Option<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Enrolls a terminal for `branch_id`.
pub fn add_terminal(
    _conn: &mut DbConn,
    _branch_id: &str,
    _name: Option<&str>,
) -> Result<IssuedTerminal, StoreError> {
    todo!()
}

/// Revokes a terminal; `false` if unknown or already revoked.
pub fn revoke_terminal(_conn: &mut DbConn, _terminal_id: Uuid) -> Result<bool, StoreError> {
    todo!()
}

/// Resolves a bearer token; `None` if unknown or revoked.
pub fn authenticate(
    _conn: &mut DbConn,
    _token: &str,
) -> Result<Option<TerminalIdentity>, StoreError> {
    todo!()
}

/// All terminals, for admin views.
pub fn list_terminals(_conn: &mut DbConn) -> Result<Vec<TerminalRecord>, StoreError> {
    todo!()
}
