//! Runs a storage test against both backends: a fresh PostgreSQL database (via testkit; the
//! test fails loudly if PostgreSQL is unreachable) and a temporary SQLite file.

use super::Database;

/// A migrated database plus whatever keeps it alive.
pub(crate) struct TestDb {
    pub(crate) db: Database,
    _pg: Option<possync_testkit::pg::TestDatabase>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// The database URL (PostgreSQL tests that open their own pools use it).
    pub(crate) fn url(&self) -> &str {
        self._pg.as_ref().map_or("", |pg| pg.url.as_str())
    }
}

/// Fresh, migrated PostgreSQL database.
pub(crate) fn postgres() -> TestDb {
    let pg = possync_testkit::pg::TestDatabase::create()
        .expect("PostgreSQL must be reachable for storage tests");
    let db = Database::connect(&pg.url, 10).expect("connect to test database");
    db.run_migrations().expect("migrate");
    TestDb {
        db,
        _pg: Some(pg),
        _dir: None,
    }
}

/// Fresh, migrated SQLite file in a temporary directory.
pub(crate) fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("cloud.db").display());
    let db = Database::connect(&url, 4).expect("open sqlite");
    db.run_migrations().expect("migrate");
    TestDb {
        db,
        _pg: None,
        _dir: Some(dir),
    }
}

/// Runs `test` once per backend, each time on a fresh database.
pub(crate) fn each_backend(test: impl Fn(&Database)) {
    for make in [postgres as fn() -> TestDb, sqlite] {
        let t = make();
        eprintln!("backend: {:?}", t.db.backend());
        test(&t.db);
    }
}
