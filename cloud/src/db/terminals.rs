//! Enrolled terminals and their bearer tokens.
//!
//! A token is 32 random bytes from the thread-local CSPRNG, base64url, prefixed `pst_` so a
//! leaked one is recognisable in logs and secret scanners. Only its sha256 is stored: a
//! database dump does not let anyone act as a terminal. Lookup is by that hash, through the
//! unique index, so authentication costs one indexed read.
//!
//! Rotation gives a terminal a new token and keeps its identity (terminal id, branch, every
//! idempotency key it ever used). The replaced token either stops at once or, with a grace,
//! keeps working until `previous_token_expires_at` so a till can be switched over without a
//! window in which it can deliver nothing. A second rotation replaces the remembered previous
//! token, so at most two tokens of one terminal ever work at the same time.

use base64::Engine as _;
use chrono::{DateTime, NaiveDateTime, Utc};
use diesel::prelude::*;
use serde::Serialize;
use uuid::Uuid;

use super::schema::terminals;
use super::{for_each_backend, now_utc, with_conn, write_txn, DbConn, StoreError};

/// Prefix of every terminal token.
pub const TOKEN_PREFIX: &str = "pst_";

/// Who a valid token belongs to: the only identity a terminal request can act as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminalIdentity {
    /// The terminal the token belongs to.
    pub terminal_id: Uuid,
    /// Its branch: every request is scoped to it.
    pub branch_id: String,
}

/// A newly enrolled terminal with its token. The token is shown this once and never again,
/// because only its hash is kept.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedTerminal {
    /// The new terminal's id.
    pub terminal_id: Uuid,
    /// Its branch.
    pub branch_id: String,
    /// The bearer token, shown once; only its sha256 is stored.
    pub token: String,
}

/// A terminal as admin views list it; holds no token material.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TerminalRecord {
    /// Terminal id.
    pub terminal_id: Uuid,
    /// Branch.
    pub branch_id: String,
    /// Operator's label.
    pub name: Option<String>,
    /// When it was enrolled.
    pub created_at: DateTime<Utc>,
    /// When its token was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// When it last called the cloud (to about a minute: see [`record_contact`]); `None` if
    /// it has not called since this was first recorded.
    pub last_seen_at: Option<DateTime<Utc>>,
    /// What it reported about itself with that contact (`None`: not reported). Shown by the
    /// fleet view, not by the terminal list.
    #[serde(skip)]
    pub reported: TillReport,
}

/// What a till reports about itself with its requests (`x-possync-catalog-version`,
/// `x-possync-needs-attention`), recorded beside its last contact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TillReport {
    /// The catalog version its copy is at.
    pub catalog_version: Option<i64>,
    /// Its sales waiting for an operator (`needs_attention` in its outbox).
    pub needs_attention: Option<i64>,
}

#[derive(Debug, Queryable, Selectable, Insertable)]
#[diesel(table_name = terminals)]
struct TerminalRow {
    terminal_id: String,
    branch_id: String,
    name: Option<String>,
    token_hash: String,
    created_at: NaiveDateTime,
    revoked_at: Option<NaiveDateTime>,
    previous_token_hash: Option<String>,
    previous_token_expires_at: Option<NaiveDateTime>,
    last_seen_at: Option<NaiveDateTime>,
    reported_catalog_version: Option<i64>,
    reported_needs_attention: Option<i64>,
}

impl TerminalRow {
    fn into_record(self) -> Result<TerminalRecord, StoreError> {
        Ok(TerminalRecord {
            terminal_id: parse_uuid(&self.terminal_id)?,
            branch_id: self.branch_id,
            name: self.name,
            created_at: self.created_at.and_utc(),
            revoked_at: self.revoked_at.map(|t| t.and_utc()),
            last_seen_at: self.last_seen_at.map(|t| t.and_utc()),
            reported: TillReport {
                catalog_version: self.reported_catalog_version,
                needs_attention: self.reported_needs_attention,
            },
        })
    }
}

fn parse_uuid(s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s)
        .map_err(|e| StoreError::Unavailable(format!("corrupt terminal id {s:?} in database: {e}")))
}

/// Longest bearer token (terminal or admin) worth looking up; anything longer cannot be one we
/// issued, and refusing it early keeps hashing bounded.
pub const MAX_TOKEN_LEN: usize = 512;

/// sha256 hex of a token, the form stored and looked up.
fn token_hash(token: &str) -> String {
    possync_protocol::sha256_hex(token.as_bytes())
}

/// A new random token: 32 bytes from the thread-local CSPRNG, base64url, prefixed.
fn new_token() -> String {
    let secret: [u8; 32] = rand::random();
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    )
}

/// Longest grace a rotated-out token may keep working: a switch-over takes minutes, and a
/// leaked token must not stay usable for long.
pub const MAX_ROTATION_GRACE_SECS: u64 = 24 * 3600;

for_each_backend! {
    pub(super) fn insert(c: &mut Conn, row: &TerminalRow) -> QueryResult<usize> {
        diesel::insert_into(terminals::table).values(row).execute(c)
    }

    pub(super) fn revoke(c: &mut Conn, id: &str) -> QueryResult<usize> {
        diesel::update(
            terminals::table
                .filter(terminals::terminal_id.eq(id))
                .filter(terminals::revoked_at.is_null()),
        )
        .set(terminals::revoked_at.eq(Some(now_utc())))
        .execute(c)
    }

    pub(super) fn by_hash(c: &mut Conn, hash: &str) -> QueryResult<Option<(String, String)>> {
        terminals::table
            .filter(terminals::token_hash.eq(hash))
            .filter(terminals::revoked_at.is_null())
            .select((terminals::terminal_id, terminals::branch_id))
            .first(c)
            .optional()
    }

    /// A rotated-out token still inside its grace.
    pub(super) fn by_previous_hash(
        c: &mut Conn,
        hash: &str,
        now: NaiveDateTime,
    ) -> QueryResult<Option<(String, String)>> {
        terminals::table
            .filter(terminals::previous_token_hash.eq(hash))
            .filter(terminals::previous_token_expires_at.gt(now))
            .filter(terminals::revoked_at.is_null())
            .select((terminals::terminal_id, terminals::branch_id))
            .first(c)
            .optional()
    }

    /// Replaces the token of a live terminal; the old one is remembered until `grace_until`
    /// (or forgotten at once when that is `None`).
    pub(super) fn rotate(
        c: &mut Conn,
        id: &str,
        new_hash: &str,
        grace_until: Option<NaiveDateTime>,
    ) -> QueryResult<usize> {
        let live = terminals::table
            .filter(terminals::terminal_id.eq(id))
            .filter(terminals::revoked_at.is_null());
        let previous = match grace_until {
            Some(_) => terminals::table
                .filter(terminals::terminal_id.eq(id))
                .select(terminals::token_hash)
                .first::<String>(c)
                .optional()?,
            None => None,
        };
        diesel::update(live)
            .set((
                terminals::token_hash.eq(new_hash),
                terminals::previous_token_hash.eq(previous),
                terminals::previous_token_expires_at.eq(grace_until),
            ))
            .execute(c)
    }

    pub(super) fn seen(c: &mut Conn, id: &str, at: NaiveDateTime, report: TillReport) -> QueryResult<usize> {
        diesel::update(terminals::table.filter(terminals::terminal_id.eq(id)))
            .set((
                terminals::last_seen_at.eq(Some(at)),
                terminals::reported_catalog_version.eq(report.catalog_version),
                terminals::reported_needs_attention.eq(report.needs_attention),
            ))
            .execute(c)
    }

    pub(super) fn all(c: &mut Conn) -> QueryResult<Vec<TerminalRow>> {
        terminals::table
            .order((terminals::branch_id, terminals::created_at, terminals::terminal_id))
            .select(TerminalRow::as_select())
            .load(c)
    }
}

/// Enrolls a terminal for `branch_id` and issues its token.
pub fn add_terminal(
    conn: &mut DbConn,
    branch_id: &str,
    name: Option<&str>,
) -> Result<IssuedTerminal, StoreError> {
    let (row, issued) = new_terminal(branch_id, name)?;
    with_conn!(conn, |c, m| m::insert(c, &row))?;
    Ok(issued)
}

/// Enrolls one terminal per entry of `branch_ids` in one transaction (a fleet's worth of tills
/// at once: `cloud terminal import`); all or none are stored.
pub fn add_terminals(
    conn: &mut DbConn,
    branch_ids: &[String],
) -> Result<Vec<IssuedTerminal>, StoreError> {
    let (rows, issued): (Vec<TerminalRow>, Vec<IssuedTerminal>) = branch_ids
        .iter()
        .map(|b| new_terminal(b, None))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    write_txn!(conn, |c, m| -> Result<(), StoreError> {
        for row in &rows {
            m::insert(c, row)?;
        }
        Ok(())
    })?;
    Ok(issued)
}

/// A checked new terminal row and what is shown once to the operator.
fn new_terminal(
    branch_id: &str,
    name: Option<&str>,
) -> Result<(TerminalRow, IssuedTerminal), StoreError> {
    if !possync_protocol::valid_branch_id(branch_id) {
        return Err(StoreError::InvalidInput(format!(
            "branch id {branch_id:?} must be 1-64 of [a-z0-9_-]"
        )));
    }
    if let Some(n) = name {
        if n.chars().count() > 200 {
            return Err(StoreError::InvalidInput(
                "terminal name must be at most 200 characters".into(),
            ));
        }
    }
    let terminal_id = Uuid::now_v7();
    let token = new_token();
    let row = TerminalRow {
        terminal_id: terminal_id.to_string(),
        branch_id: branch_id.to_string(),
        name: name.map(str::to_string),
        token_hash: token_hash(&token),
        created_at: now_utc(),
        revoked_at: None,
        previous_token_hash: None,
        previous_token_expires_at: None,
        last_seen_at: None,
        reported_catalog_version: None,
        reported_needs_attention: None,
    };
    Ok((
        row,
        IssuedTerminal {
            terminal_id,
            branch_id: branch_id.to_string(),
            token,
        },
    ))
}

/// Revokes a terminal: its token stops authenticating at once. `false` if the terminal is
/// unknown or already revoked. Its ingested sales stay.
pub fn revoke_terminal(conn: &mut DbConn, terminal_id: Uuid) -> Result<bool, StoreError> {
    let id = terminal_id.to_string();
    let n = with_conn!(conn, |c, m| m::revoke(c, &id))?;
    Ok(n > 0)
}

/// Issues a new token for a live terminal, keeping its identity: terminal id, branch and every
/// idempotency key stay, so sales the till has not sent yet flush under the new token. The
/// old token is refused from the next request, or after `grace` when one is given (at most
/// [`MAX_ROTATION_GRACE_SECS`]). `None` if the terminal is unknown or revoked: a revoked
/// terminal is retired for good, and a till that needs to sell again is enrolled anew.
pub fn rotate_terminal(
    conn: &mut DbConn,
    terminal_id: Uuid,
    grace: Option<std::time::Duration>,
) -> Result<Option<IssuedTerminal>, StoreError> {
    let grace_until = match grace.filter(|g| !g.is_zero()) {
        None => None,
        Some(g) if g.as_secs() > MAX_ROTATION_GRACE_SECS => {
            return Err(StoreError::InvalidInput(format!(
                "grace must be at most {MAX_ROTATION_GRACE_SECS} seconds"
            )))
        }
        Some(g) => {
            let g = chrono::Duration::from_std(g)
                .map_err(|e| StoreError::InvalidInput(format!("grace: {e}")))?;
            Some(now_utc() + g)
        }
    };
    let id = terminal_id.to_string();
    let token = new_token();
    let hash = token_hash(&token);
    let rotated = write_txn!(conn, |c, m| -> Result<Option<String>, StoreError> {
        if m::rotate(c, &id, &hash, grace_until)? == 0 {
            return Ok(None);
        }
        let branch: String = terminals::table
            .filter(terminals::terminal_id.eq(&id))
            .select(terminals::branch_id)
            .first(c)?;
        Ok(Some(branch))
    })?;
    Ok(rotated.map(|branch_id| IssuedTerminal {
        terminal_id,
        branch_id,
        token,
    }))
}

/// Resolves a bearer token to its terminal; `None` if unknown or revoked (the caller answers
/// 401 either way, without saying which). A token replaced by a rotation counts only while
/// its grace lasts.
pub fn authenticate(
    conn: &mut DbConn,
    token: &str,
) -> Result<Option<TerminalIdentity>, StoreError> {
    if !token.starts_with(TOKEN_PREFIX) || token.len() > MAX_TOKEN_LEN {
        return Ok(None);
    }
    let hash = token_hash(token);
    let found = match with_conn!(conn, |c, m| m::by_hash(c, &hash))? {
        Some(f) => Some(f),
        None => with_conn!(conn, |c, m| m::by_previous_hash(c, &hash, now_utc()))?,
    };
    found
        .map(|(id, branch_id)| {
            Ok(TerminalIdentity {
                terminal_id: parse_uuid(&id)?,
                branch_id,
            })
        })
        .transpose()
}

/// Records that `terminal_id` called the cloud now (its `last_seen_at`) and what it reported
/// with that call. Callers throttle this with [`ContactLog`] so a busy till costs one write a
/// minute, not one per request.
pub fn record_contact(
    conn: &mut DbConn,
    terminal_id: Uuid,
    report: TillReport,
) -> Result<(), StoreError> {
    let id = terminal_id.to_string();
    with_conn!(conn, |c, m| m::seen(c, &id, now_utc(), report))?;
    Ok(())
}

/// How often a terminal's `last_seen_at` is written at most (per cloud instance).
pub const CONTACT_RECORD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Most terminals a [`ContactLog`] remembers; beyond it the least recently seen is forgotten
/// (it then records once more: a bounded cost, never unbounded memory).
const MAX_CONTACTS_REMEMBERED: usize = 200_000;

/// When this instance last wrote each terminal's `last_seen_at`: decides whether a request
/// should write it again ([`CONTACT_RECORD_INTERVAL`]). A bounded map in recency order, like
/// the rate limiter's buckets.
#[derive(Debug)]
pub struct ContactLog {
    recorded: std::sync::Mutex<hashlink::LruCache<Uuid, std::time::Instant>>,
}

impl Default for ContactLog {
    fn default() -> Self {
        ContactLog {
            recorded: std::sync::Mutex::new(hashlink::LruCache::new(MAX_CONTACTS_REMEMBERED)),
        }
    }
}

impl ContactLog {
    /// Whether a contact of `terminal_id` at `now` is due to be written; if so it counts as
    /// written from now on (a failed write is retried after the interval, not at once).
    pub fn due(&self, terminal_id: Uuid, now: std::time::Instant) -> bool {
        let mut map = self
            .recorded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match map.get(&terminal_id) {
            Some(last) if now.saturating_duration_since(*last) < CONTACT_RECORD_INTERVAL => false,
            _ => {
                map.insert(terminal_id, now);
                true
            }
        }
    }
}

/// All terminals (revoked ones included), ordered by branch then enrolment, for admin views.
pub fn list_terminals(conn: &mut DbConn) -> Result<Vec<TerminalRecord>, StoreError> {
    let rows = with_conn!(conn, |c, m| m::all(c))?;
    rows.into_iter().map(TerminalRow::into_record).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::test_support::each_backend;

    #[test]
    fn add_authenticate_revoke() {
        each_backend(|db| {
            let mut conn = db.conn().expect("conn");
            let issued = add_terminal(&mut conn, "b1", Some("till 1")).expect("add");
            assert!(issued.token.starts_with(TOKEN_PREFIX));
            // 32 bytes base64url without padding = 43 characters.
            assert_eq!(issued.token.len(), TOKEN_PREFIX.len() + 43);
            let other = add_terminal(&mut conn, "b2", None).expect("add");
            assert_ne!(issued.token, other.token);

            let who = authenticate(&mut conn, &issued.token).expect("auth");
            assert_eq!(
                who,
                Some(TerminalIdentity {
                    terminal_id: issued.terminal_id,
                    branch_id: "b1".into()
                })
            );
            assert_eq!(authenticate(&mut conn, "pst_unknown").expect("auth"), None);
            assert_eq!(authenticate(&mut conn, "").expect("auth"), None);

            assert!(revoke_terminal(&mut conn, issued.terminal_id).expect("revoke"));
            assert!(!revoke_terminal(&mut conn, issued.terminal_id).expect("revoke again"));
            assert!(!revoke_terminal(&mut conn, Uuid::now_v7()).expect("revoke unknown"));
            assert_eq!(authenticate(&mut conn, &issued.token).expect("auth"), None);
            assert!(authenticate(&mut conn, &other.token)
                .expect("auth")
                .is_some());

            let list = list_terminals(&mut conn).expect("list");
            assert_eq!(list.len(), 2);
            assert_eq!(list[0].terminal_id, issued.terminal_id);
            assert_eq!(list[0].name.as_deref(), Some("till 1"));
            assert!(list[0].revoked_at.is_some());
            assert!(list[1].revoked_at.is_none());
        });
    }

    #[test]
    fn the_token_itself_is_never_stored() {
        each_backend(|db| {
            let mut conn = db.conn().expect("conn");
            let issued = add_terminal(&mut conn, "b1", None).expect("add");
            let rows = with_conn!(&mut *conn, |c, m| m::all(c)).expect("rows");
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].token_hash, token_hash(&issued.token));
            assert!(!rows[0]
                .token_hash
                .contains(&issued.token[TOKEN_PREFIX.len()..]));
        });
    }

    #[test]
    fn rotation_keeps_the_identity_and_refuses_the_old_token_at_once() {
        each_backend(|db| {
            let mut conn = db.conn().expect("conn");
            let first = add_terminal(&mut conn, "b1", Some("till")).expect("add");
            let rotated = rotate_terminal(&mut conn, first.terminal_id, None)
                .expect("rotate")
                .expect("live terminal");
            assert_eq!(rotated.terminal_id, first.terminal_id);
            assert_eq!(rotated.branch_id, "b1");
            assert_ne!(rotated.token, first.token);
            assert_eq!(authenticate(&mut conn, &first.token).expect("auth"), None);
            assert_eq!(
                authenticate(&mut conn, &rotated.token).expect("auth"),
                Some(TerminalIdentity {
                    terminal_id: first.terminal_id,
                    branch_id: "b1".into()
                })
            );
            assert_eq!(list_terminals(&mut conn).expect("list").len(), 1);
            assert!(rotate_terminal(&mut conn, Uuid::now_v7(), None)
                .expect("unknown")
                .is_none());
            assert!(revoke_terminal(&mut conn, first.terminal_id).expect("revoke"));
            assert!(rotate_terminal(&mut conn, first.terminal_id, None)
                .expect("revoked")
                .is_none());
        });
    }

    #[test]
    fn a_grace_keeps_the_old_token_until_it_ends_and_only_one_old_token() {
        each_backend(|db| {
            let mut conn = db.conn().expect("conn");
            let first = add_terminal(&mut conn, "b1", None).expect("add");
            let hour = std::time::Duration::from_secs(3600);
            let second = rotate_terminal(&mut conn, first.terminal_id, Some(hour))
                .expect("rotate")
                .expect("live");
            assert!(authenticate(&mut conn, &first.token)
                .expect("auth")
                .is_some());
            assert!(authenticate(&mut conn, &second.token)
                .expect("auth")
                .is_some());
            // A second rotation forgets the first token even though its grace had not ended.
            let third = rotate_terminal(&mut conn, first.terminal_id, Some(hour))
                .expect("rotate")
                .expect("live");
            assert_eq!(authenticate(&mut conn, &first.token).expect("auth"), None);
            assert!(authenticate(&mut conn, &second.token)
                .expect("auth")
                .is_some());
            assert!(authenticate(&mut conn, &third.token)
                .expect("auth")
                .is_some());
            // A grace that has ended no longer authenticates.
            let fourth = rotate_terminal(
                &mut conn,
                first.terminal_id,
                Some(std::time::Duration::from_millis(1)),
            )
            .expect("rotate")
            .expect("live");
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(authenticate(&mut conn, &third.token).expect("auth"), None);
            assert!(authenticate(&mut conn, &fourth.token)
                .expect("auth")
                .is_some());
            // Revocation ends the grace too.
            let fifth = rotate_terminal(&mut conn, first.terminal_id, Some(hour))
                .expect("rotate")
                .expect("live");
            assert!(revoke_terminal(&mut conn, first.terminal_id).expect("revoke"));
            assert_eq!(authenticate(&mut conn, &fourth.token).expect("auth"), None);
            assert_eq!(authenticate(&mut conn, &fifth.token).expect("auth"), None);
            assert!(matches!(
                rotate_terminal(
                    &mut conn,
                    first.terminal_id,
                    Some(std::time::Duration::from_secs(MAX_ROTATION_GRACE_SECS + 1))
                ),
                Err(StoreError::InvalidInput(_))
            ));
        });
    }

    #[test]
    fn contact_is_recorded_and_listed() {
        each_backend(|db| {
            let mut conn = db.conn().expect("conn");
            let t = add_terminal(&mut conn, "b1", None).expect("add");
            assert_eq!(
                list_terminals(&mut conn).expect("list")[0].last_seen_at,
                None
            );
            let before = Utc::now() - chrono::Duration::seconds(1);
            record_contact(&mut conn, t.terminal_id, TillReport::default()).expect("record");
            let seen = list_terminals(&mut conn).expect("list")[0]
                .last_seen_at
                .expect("recorded");
            assert!(seen >= before && seen <= Utc::now(), "{seen}");
            assert_eq!(
                list_terminals(&mut conn).expect("list")[0].reported,
                TillReport::default()
            );
            let report = TillReport {
                catalog_version: Some(41),
                needs_attention: Some(2),
            };
            record_contact(&mut conn, t.terminal_id, report).expect("record");
            assert_eq!(list_terminals(&mut conn).expect("list")[0].reported, report);
        });
    }

    #[test]
    fn contact_writes_are_throttled_per_terminal() {
        let log = ContactLog::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let t0 = std::time::Instant::now();
        assert!(log.due(a, t0));
        assert!(!log.due(a, t0 + std::time::Duration::from_secs(59)));
        assert!(log.due(b, t0 + std::time::Duration::from_secs(1)));
        assert!(log.due(a, t0 + CONTACT_RECORD_INTERVAL));
    }

    #[test]
    fn bad_branch_is_refused() {
        each_backend(|db| {
            let mut conn = db.conn().expect("conn");
            assert!(matches!(
                add_terminal(&mut conn, "Bad Branch", None),
                Err(StoreError::InvalidInput(_))
            ));
        });
    }
}
