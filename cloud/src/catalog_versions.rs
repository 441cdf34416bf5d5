//! What this instance knows about the catalog's versions without asking the database, so an
//! empty delta poll — the common case: 10 000 tills polling every 30 s while the catalog
//! changes a few times a minute — is answered from memory.
//!
//! [`CatalogVersions`] holds the committed counter (`version`, `horizon`) and, per branch,
//! the newest version that changed something that branch sees (its own entities; global ones
//! are kept apart and count for every branch). A delta from `since` is known to be empty when
//! `horizon <= since <= version` and no change visible to the branch lies after `since`; the
//! answer is then the page the database would have given at `version`: no changes,
//! `next_since = catalog_version = version`.
//!
//! Across instances it is kept current by PostgreSQL: every change of `catalog_counter`
//! NOTIFYs channel [`CHANNEL`] at commit (migration `2026-11-29-000007_catalog_notify`), and
//! each instance runs one [`listen`] thread on its own connection (outside the pool). On a
//! notification the thread reads which branches changed after the version it knew (one
//! indexed range query per notification, not per poll) and moves the counter forward.
//!
//! Bound: a change committed through instance A is reflected by instance B's shortcut within
//! the notification's delivery plus [`POLL_INTERVAL`]; until then B answers as of the older
//! committed version — a consistent, slightly stale page, like a read replica's (the till
//! receives the change on its next poll). A `since` newer than what B knows goes to the
//! database. When the listener loses its connection (PostgreSQL restart, network), it forgets
//! everything first, so every poll goes to the database until it has reconnected, LISTENs
//! again and reloaded the full state.
//!
//! The embedded SQLite cloud starts no listener: its polls always query the local file (and a
//! `cloud catalog` command in another process could change it unseen).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use possync_protocol::DeltaPage;

use crate::metrics::Metrics;

/// The notification channel (see the migration).
pub const CHANNEL: &str = "possync_catalog";
/// `application_name` of the listener's connection (visible in `pg_stat_activity`).
pub const LISTENER_APPLICATION_NAME: &str = "possync-catalog-listener";
/// How often the listener takes in notifications that arrived.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// With no notification for this long, the listener checks its connection with `SELECT 1`.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Longest wait between reconnection attempts.
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(5);

/// The counter and the newest change per branch, as of one committed version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    /// The committed catalog version these figures are complete up to.
    pub version: i64,
    /// Deletes up to here were purged (delta cursors below it get 410).
    pub horizon: i64,
    /// Newest version of a global entity (0: none).
    pub global_change: i64,
    /// Newest version of an entity of each branch (absent: none).
    pub branch_change: HashMap<String, i64>,
}

/// Shared by every worker of one instance; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct CatalogVersions {
    known: Arc<RwLock<Option<Known>>>,
}

impl CatalogVersions {
    /// The empty delta page for `branch` from `since`, if this instance knows there is no
    /// change for it (module docs); `None` means "ask the database".
    pub fn empty_delta(&self, branch: &str, since: i64) -> Option<DeltaPage> {
        let guard = self.known.read().unwrap_or_else(|p| p.into_inner());
        let k = guard.as_ref()?;
        let newest = k
            .branch_change
            .get(branch)
            .copied()
            .unwrap_or(0)
            .max(k.global_change);
        (since >= k.horizon && since <= k.version && since >= newest).then(|| DeltaPage {
            changes: Vec::new(),
            next_since: k.version,
            has_more: false,
            catalog_version: k.version,
        })
    }

    /// Whether the shortcut is on (the listener is connected and loaded).
    pub fn is_live(&self) -> bool {
        self.known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Replaces everything known (after a full load).
    pub fn set(&self, known: Known) {
        *self.known.write().unwrap_or_else(|p| p.into_inner()) = Some(known);
    }

    /// Forgets everything: every poll goes to the database until the next [`set`](Self::set).
    pub fn forget(&self) {
        *self.known.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The version known now, if any.
    pub fn version(&self) -> Option<i64> {
        self.known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|k| k.version)
    }

    /// Applies the changes read after a notification: `changes` are (branch, newest version)
    /// of every entity written after the known version (read after the notification, so
    /// complete up to `version` at least), then moves the counter to `version`/`horizon`.
    /// Ignored when nothing is known or `version` is not newer.
    fn advance(&self, version: i64, horizon: i64, changes: Vec<BranchChange>) {
        let mut guard = self.known.write().unwrap_or_else(|p| p.into_inner());
        let Some(k) = guard.as_mut() else {
            return;
        };
        for ch in changes {
            let slot = match ch.branch_id {
                None => &mut k.global_change,
                Some(b) => k.branch_change.entry(b).or_insert(0),
            };
            *slot = (*slot).max(ch.newest);
        }
        if version > k.version {
            k.version = version;
        }
        k.horizon = k.horizon.max(horizon);
    }
}

/// One row of the per-branch newest-change query.
#[derive(Debug, QueryableByName)]
struct BranchChange {
    #[diesel(sql_type = Nullable<Text>)]
    branch_id: Option<String>,
    #[diesel(sql_type = BigInt)]
    newest: i64,
}

#[derive(Debug, QueryableByName)]
struct Counter {
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = BigInt)]
    horizon: i64,
}

/// Newest version per branch (NULL: global) of entities changed after `after`, tombstones
/// included; uses the unique version index for the small range of a notification.
fn changes_after(c: &mut PgConnection, after: i64) -> diesel::QueryResult<Vec<BranchChange>> {
    diesel::sql_query(
        "SELECT branch_id, max(version) AS newest FROM catalog_entities \
         WHERE version > $1 GROUP BY branch_id",
    )
    .bind::<BigInt, _>(after)
    .load(c)
}

/// The full state in one snapshot: counter and newest change per branch.
fn load_all(c: &mut PgConnection) -> diesel::QueryResult<Known> {
    c.build_transaction()
        .repeatable_read()
        .read_only()
        .run(|c| {
            let counter: Counter =
                diesel::sql_query("SELECT version, horizon FROM catalog_counter WHERE id = 1")
                    .get_result(c)?;
            let mut known = Known {
                version: counter.version,
                horizon: counter.horizon,
                ..Known::default()
            };
            for ch in changes_after(c, -1)? {
                match ch.branch_id {
                    None => known.global_change = ch.newest,
                    Some(b) => {
                        known.branch_change.insert(b, ch.newest);
                    }
                }
            }
            Ok(known)
        })
}

/// Parses a notification payload `"VERSION HORIZON"`.
fn parse_payload(payload: &str) -> Option<(i64, i64)> {
    let (v, h) = payload.split_once(' ')?;
    Some((v.parse().ok()?, h.parse().ok()?))
}

/// Why the listener's connection ended; it then forgets everything and reconnects.
#[derive(Debug, thiserror::Error)]
enum ListenerError {
    /// The connection could not be opened.
    #[error("cannot connect: {0}")]
    Connect(#[from] diesel::ConnectionError),
    /// A statement, or taking in notifications, failed: the connection is gone.
    #[error("connection lost: {0}")]
    Lost(#[from] diesel::result::Error),
}

/// Starts the listener thread for `database_url` (PostgreSQL); it runs for the life of the
/// process, reconnecting forever.
pub fn listen(versions: CatalogVersions, database_url: String, metrics: Metrics) {
    let spawned = std::thread::Builder::new()
        .name("catalog-listener".into())
        .spawn(move || {
            let mut wait = Duration::from_millis(100);
            loop {
                match listen_once(&versions, &database_url, &metrics) {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "catalog listener lost; empty delta polls query the database until it reconnects")
                    }
                }
                versions.forget();
                metrics.catalog_listener_connected.set(0);
                std::thread::sleep(wait);
                wait = (wait * 2).min(MAX_RECONNECT_WAIT);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the catalog listener; delta polls always query the database");
    }
}

/// One connection's life: LISTEN first (so nothing committed after the load is missed), load
/// everything, then follow notifications until the connection fails.
fn listen_once(
    versions: &CatalogVersions,
    database_url: &str,
    metrics: &Metrics,
) -> Result<(), ListenerError> {
    let mut c = PgConnection::establish(&crate::db::with_tcp_keepalives(database_url))?;
    c.batch_execute(&format!(
        "SET application_name = '{LISTENER_APPLICATION_NAME}'; LISTEN {CHANNEL}"
    ))?;
    let known = load_all(&mut c)?;
    tracing::info!(
        version = known.version,
        branches = known.branch_change.len(),
        "catalog listener connected"
    );
    versions.set(known);
    metrics.catalog_listener_connected.set(1);
    let mut last_heard = Instant::now();
    loop {
        std::thread::sleep(POLL_INTERVAL);
        let mut newest: Option<(i64, i64)> = None;
        for n in c.notifications_iter() {
            let n = n?;
            match parse_payload(&n.payload) {
                Some((v, h)) => {
                    newest = Some(newest.map_or((v, h), |(v0, h0)| (v0.max(v), h0.max(h))))
                }
                None => tracing::warn!(payload = %n.payload, "unreadable catalog notification"),
            }
        }
        match newest {
            Some((version, horizon)) => {
                last_heard = Instant::now();
                let Some(known) = versions.version() else {
                    return Ok(());
                };
                let changes = if version > known {
                    changes_after(&mut c, known)?
                } else {
                    Vec::new() // a purge moved only the horizon
                };
                versions.advance(version, horizon, changes);
                metrics.catalog_notifications.inc();
            }
            None if last_heard.elapsed() >= HEARTBEAT => {
                diesel::sql_query("SELECT 1").execute(&mut c)?;
                last_heard = Instant::now();
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Known {
        Known {
            version: 10,
            horizon: 2,
            global_change: 4,
            branch_change: HashMap::from([("north".to_string(), 8)]),
        }
    }

    #[test]
    fn nothing_known_means_ask_the_database() {
        let v = CatalogVersions::default();
        assert!(v.empty_delta("north", 10).is_none());
        assert!(!v.is_live());
    }

    #[test]
    fn an_empty_delta_is_answered_at_the_known_version() {
        let v = CatalogVersions::default();
        v.set(known());
        let page = v
            .empty_delta("north", 8)
            .expect("nothing after 8 for north");
        assert!(page.changes.is_empty());
        assert_eq!((page.next_since, page.catalog_version), (10, 10));
        assert!(!page.has_more);
        // Another branch only sees global changes (newest 4).
        assert!(v.empty_delta("south", 4).is_some());
    }

    #[test]
    fn changes_after_since_expired_cursors_and_unknown_versions_go_to_the_database() {
        let v = CatalogVersions::default();
        v.set(known());
        assert!(v.empty_delta("north", 7).is_none(), "north changed at 8");
        assert!(v.empty_delta("south", 3).is_none(), "a global change at 4");
        assert!(
            v.empty_delta("south", 1).is_none(),
            "below the horizon: 410"
        );
        assert!(
            v.empty_delta("north", 11).is_none(),
            "ahead of what is known"
        );
    }

    #[test]
    fn advancing_records_the_changed_branches_and_forgetting_turns_the_shortcut_off() {
        let v = CatalogVersions::default();
        v.set(known());
        v.advance(
            12,
            2,
            vec![BranchChange {
                branch_id: Some("south".into()),
                newest: 12,
            }],
        );
        assert!(v.empty_delta("south", 10).is_none(), "south changed at 12");
        assert_eq!(
            v.empty_delta("north", 10).map(|p| p.catalog_version),
            Some(12)
        );
        v.forget();
        assert!(v.empty_delta("north", 12).is_none());
    }

    #[test]
    fn payloads_parse() {
        assert_eq!(parse_payload("42 7"), Some((42, 7)));
        assert_eq!(parse_payload("x"), None);
    }
}
