//! Opening the database: migrations from empty, idempotent re-open, the backup taken before
//! migrating an existing file, and refusing a file from a newer build.

mod fixtures;

use fixtures::*;
use possync_terminal::store::schema::{self, latest_version};
use possync_terminal::store::{SqliteStore, TerminalStoreError};

const TABLES: [&str; 8] = [
    "catalog_meta",
    "catalog_entities",
    "catalog_id_map",
    "sync_journal",
    "sync_state",
    "sales",
    "local_inventory",
    "schema_migrations",
];

#[test]
fn a_new_database_gets_every_table_wal_and_no_backup() {
    let (dir, path) = temp_db();
    let (store, report) = SqliteStore::open_with_report(&path).expect("open");
    assert_eq!(report.from_version, 0);
    assert_eq!(report.applied, (1..=latest_version()).collect::<Vec<_>>());
    assert_eq!(report.backup_path, None, "nothing to protect in a new file");
    assert_eq!(report.legacy, None);
    let conn = raw(&path);
    for t in TABLES {
        assert!(schema::table_exists(&conn, t).expect("q"), "{t} missing");
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("mode");
    assert_eq!(mode, "wal");
    assert_eq!(schema::current_version(&conn).expect("v"), latest_version());
    assert_eq!(
        count(&path, "schema_migrations"),
        i64::from(latest_version())
    );
    assert!(!store.pos_id().is_nil());
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .expect("ls")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".bak-"))
        .collect();
    assert!(files.is_empty());
}

#[test]
fn reopening_is_idempotent_and_keeps_the_pos_id() {
    let (_dir, path) = temp_db();
    let first = open(&path);
    let pos_id = first.pos_id();
    first.adjust_local_inventory("p1", 3).expect("write");
    drop(first);
    let before = dump(&path, "schema_migrations");
    let (again, report) = SqliteStore::open_with_report(&path).expect("reopen");
    assert_eq!(again.pos_id(), pos_id, "pos_id is generated once");
    assert!(report.applied.is_empty());
    assert_eq!(report.backup_path, None, "no pending migration, no backup");
    assert_eq!(dump(&path, "schema_migrations"), before);
    assert_eq!(again.local_inventory("p1").expect("read"), Some(3));
    // two handles on one file (daemon + CLI) agree
    let other = open(&path);
    assert_eq!(other.pos_id(), pos_id);
}

#[test]
fn an_existing_database_is_backed_up_before_its_first_pending_migration() {
    let (dir, path) = temp_db();
    {
        let mut conn = raw(&path);
        schema::apply_pending(&mut conn, 1).expect("v1 only");
        conn.execute(
            "INSERT INTO catalog_meta (key, value) VALUES ('catalog_version', '42')",
            [],
        )
        .expect("data at v1");
    }
    let (store, report) = SqliteStore::open_with_report(&path).expect("open migrates");
    assert_eq!(report.from_version, 1);
    assert_eq!(report.applied, (2..=latest_version()).collect::<Vec<_>>());
    let backup = report.backup_path.expect("backup taken");
    let name = backup
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    assert!(
        name.starts_with("terminal.db.bak-") && name.ends_with("-v1"),
        "{name}"
    );
    assert_eq!(backup.parent(), Some(dir.path()));
    // the copy is the database as it was: version 1, with its data, without later tables
    let copy = raw(&backup);
    assert_eq!(schema::current_version(&copy).expect("v"), 1);
    let v: String = copy
        .query_row(
            "SELECT value FROM catalog_meta WHERE key = 'catalog_version'",
            [],
            |r| r.get(0),
        )
        .expect("data in backup");
    assert_eq!(v, "42");
    assert!(!schema::table_exists(&copy, "sales").expect("q"));
    // and the live file moved on with its data intact
    assert_eq!(store.catalog_stats().expect("stats").version, Some(42));
    assert!(schema::table_exists(&raw(&path), "sales").expect("q"));
}

#[test]
fn a_database_from_a_newer_build_is_refused_untouched() {
    let (_dir, path) = temp_db();
    drop(open(&path));
    raw(&path)
        .pragma_update(None, "user_version", latest_version() + 1)
        .expect("pretend newer");
    let before = dump(&path, "sync_state");
    let err = SqliteStore::open(&path).expect_err("refused");
    assert!(matches!(err, TerminalStoreError::TooNew { .. }), "{err}");
    assert_eq!(dump(&path, "sync_state"), before);
}
