//! Numbered schema migrations and the safety copy taken before they run.
//!
//! The SQL lives in `migrations/terminal/NNNN_*.sql` and is compiled in, so a terminal binary
//! always carries exactly the schema it was tested with. `PRAGMA user_version` holds the
//! applied number (it lives in the file header and changes inside the migration's own
//! transaction), and `schema_migrations` keeps a readable history of when each one ran.

use chrono::Utc;
use rusqlite::{Connection, OptionalExtension};
use std::path::{Path, PathBuf};

use super::error::TerminalStoreError;
use super::time_text;

/// One numbered schema step.
pub struct Migration {
    /// Position in the sequence, starting at 1; equals `user_version` once applied.
    pub version: u32,
    /// File name stem, for the history table and error messages.
    pub name: &'static str,
    /// The SQL, run as one batch inside the migration's transaction.
    pub sql: &'static str,
}

/// Every migration this build knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_sync_tables",
        sql: include_str!("../../../migrations/terminal/0001_sync_tables.sql"),
    },
    Migration {
        version: 2,
        name: "0002_pos_tables",
        sql: include_str!("../../../migrations/terminal/0002_pos_tables.sql"),
    },
    Migration {
        version: 3,
        name: "0003_live_catalog_index",
        sql: include_str!("../../../migrations/terminal/0003_live_catalog_index.sql"),
    },
    Migration {
        version: 4,
        name: "0004_journal_counts",
        sql: include_str!("../../../migrations/terminal/0004_journal_counts.sql"),
    },
    Migration {
        version: 5,
        name: "0005_outage_never_parks",
        sql: include_str!("../../../migrations/terminal/0005_outage_never_parks.sql"),
    },
    Migration {
        version: 6,
        name: "0006_journal_chain",
        sql: include_str!("../../../migrations/terminal/0006_journal_chain.sql"),
    },
    Migration {
        version: 7,
        name: "0007_sale_idempotency_keys",
        sql: include_str!("../../../migrations/terminal/0007_sale_idempotency_keys.sql"),
    },
];

/// The schema version a fully migrated database has.
pub fn latest_version() -> u32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Reads `PRAGMA user_version`.
pub fn current_version(conn: &Connection) -> Result<u32, TerminalStoreError> {
    let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    u32::try_from(v).map_err(|_| TerminalStoreError::Corrupt(format!("user_version {v}")))
}

/// Whether the file holds any table, index or trigger — i.e. whether there is anything a
/// migration could damage and a backup should protect.
pub fn has_user_objects(conn: &Connection) -> Result<bool, TerminalStoreError> {
    let n: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'",
        [],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

/// Whether a table of that name exists.
pub fn table_exists(conn: &Connection, name: &str) -> Result<bool, TerminalStoreError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Copies the whole database to `<db>.bak-<UTC timestamp>-v<from>` with SQLite's online
/// backup API (a consistent copy even with WAL), and returns the path of the copy.
pub fn backup(
    conn: &Connection,
    db_path: &Path,
    from_version: u32,
) -> Result<PathBuf, TerminalStoreError> {
    let stamp = Utc::now().format("%Y%m%dT%H%M%SZ");
    let base = format!("{}.bak-{stamp}-v{from_version}", db_path.display());
    let mut target = PathBuf::from(&base);
    let mut n = 1;
    while target.exists() {
        target = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    conn.backup(rusqlite::MAIN_DB, &target, None)
        .map_err(|source| TerminalStoreError::Backup {
            path: target.display().to_string(),
            source,
        })?;
    tracing::info!(backup = %target.display(), from_version, "database backed up before migrating");
    Ok(target)
}

/// Applies every migration above the current version, each in its own transaction, up to
/// `target`. Returns the numbers applied.
pub fn apply_pending(conn: &mut Connection, target: u32) -> Result<Vec<u32>, TerminalStoreError> {
    let mut applied = Vec::new();
    let current = current_version(conn)?;
    for m in MIGRATIONS
        .iter()
        .filter(|m| m.version > current && m.version <= target)
    {
        let wrap = |source| TerminalStoreError::Migration {
            version: m.version,
            name: m.name,
            source,
        };
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(wrap)?;
        // Another process may have applied it while we waited for the write lock.
        if current_version(&tx)? >= m.version {
            continue;
        }
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    INTEGER PRIMARY KEY NOT NULL,
                 name       TEXT NOT NULL,
                 applied_at TEXT NOT NULL
             );",
        )
        .map_err(wrap)?;
        tx.execute_batch(m.sql).map_err(wrap)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            rusqlite::params![m.version, m.name, time_text(Utc::now())],
        )
        .map_err(wrap)?;
        tx.pragma_update(None, "user_version", m.version)
            .map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "schema migration applied"
        );
        applied.push(m.version);
    }
    Ok(applied)
}

/// Refuses to touch a database written by a newer build.
pub fn check_not_newer(conn: &Connection) -> Result<u32, TerminalStoreError> {
    let found = current_version(conn)?;
    if found > latest_version() {
        return Err(TerminalStoreError::TooNew {
            found,
            known: latest_version(),
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{}", m.name);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }

    #[test]
    fn partial_then_full_migration_records_each_step() {
        let mut conn = Connection::open_in_memory().expect("open");
        assert_eq!(apply_pending(&mut conn, 1).expect("v1"), vec![1]);
        assert_eq!(current_version(&conn).expect("v"), 1);
        assert!(!table_exists(&conn, "sales").expect("q"));
        assert_eq!(
            apply_pending(&mut conn, latest_version()).expect("rest"),
            (2..=latest_version()).collect::<Vec<_>>()
        );
        assert!(table_exists(&conn, "sales").expect("q"));
        let n: i64 = conn
            .query_row("SELECT count(*) FROM schema_migrations", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, i64::from(latest_version()));
        assert!(apply_pending(&mut conn, latest_version())
            .expect("again")
            .is_empty());
    }

    #[test]
    fn journal_counts_start_from_the_rows_already_there_and_follow_every_change() {
        let mut conn = Connection::open_in_memory().expect("open");
        apply_pending(&mut conn, 3).expect("v3");
        conn.execute_batch(
            "INSERT INTO sync_journal (pos_id, local_event_id, event_type, event, status, created_at, updated_at)
             VALUES ('p', 1, 'sale', '{}', 'synced', 't', 't'), ('p', 2, 'sale', '{}', 'synced', 't', 't'),
                    ('p', 3, 'sale', '{}', 'failed', 't', 't'), ('p', 4, 'sale', '{}', 'pending', 't', 't');",
        )
        .expect("rows before the migration");
        apply_pending(&mut conn, latest_version()).expect("rest");
        conn.execute_batch(
            "INSERT INTO sync_journal (pos_id, local_event_id, event_type, event, status, created_at, updated_at)
             VALUES ('p', 5, 'sale', '{}', 'pending', 't', 't');
             UPDATE sync_journal SET status = 'in_flight' WHERE local_event_id IN (3, 4);
             UPDATE sync_journal SET status = 'needs_attention' WHERE local_event_id = 3;
             UPDATE sync_journal SET attempts = 1 WHERE local_event_id = 5;
             DELETE FROM sync_journal WHERE local_event_id = 4;",
        )
        .expect("changes after it");
        let read = |sql: &str| -> Vec<(String, i64)> {
            conn.prepare(sql)
                .expect("prepare")
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .expect("query")
                .collect::<Result<_, _>>()
                .expect("rows")
        };
        let kept = read("SELECT status, n FROM sync_journal_counts WHERE n > 0 ORDER BY status");
        let actual =
            read("SELECT status, count(*) FROM sync_journal GROUP BY status ORDER BY status");
        assert_eq!(kept, actual);
        assert_eq!(
            actual,
            vec![
                ("needs_attention".to_string(), 1),
                ("pending".to_string(), 1),
                ("synced".to_string(), 2)
            ]
        );
    }

    #[test]
    fn a_failing_migration_leaves_the_previous_version() {
        let mut conn = Connection::open_in_memory().expect("open");
        apply_pending(&mut conn, 1).expect("v1");
        // make migration 2 fail half-way: it creates `sales`, then `local_inventory` already exists
        conn.execute_batch("CREATE TABLE local_inventory (x INTEGER)")
            .expect("squat");
        let err = apply_pending(&mut conn, 2).expect_err("must fail");
        assert!(matches!(
            err,
            TerminalStoreError::Migration { version: 2, .. }
        ));
        assert_eq!(current_version(&conn).expect("v"), 1);
        assert!(!table_exists(&conn, "sales").expect("q"), "rolled back");
    }

    #[test]
    fn a_newer_database_is_refused() {
        let conn = Connection::open_in_memory().expect("open");
        conn.pragma_update(None, "user_version", latest_version() + 1)
            .expect("set");
        assert!(matches!(
            check_not_newer(&conn),
            Err(TerminalStoreError::TooNew { .. })
        ));
    }
}
