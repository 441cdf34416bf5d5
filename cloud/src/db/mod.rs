//! Cloud storage: one Diesel schema served by PostgreSQL (production) or SQLite (embedded),
//! behind an r2d2 connection pool.
//!
//! Every query is written once and compiled for both backends: the query modules put their
//! bodies inside [`for_each_backend!`], which instantiates them once with
//! `Conn = PgConnection` and once with `Conn = SqliteConnection`, and the public functions
//! dispatch on the [`DbConn`] variant. Write transactions use [`write_txn!`] so that SQLite
//! takes its write lock up front (`BEGIN IMMEDIATE`) instead of upgrading a read lock, which
//! would fail with `SQLITE_BUSY` under concurrent writers.
//!
//! Every function here is blocking. The HTTP layer calls them through [`Database::run`] (or,
//! in the ingestion actors, `spawn_blocking`), never on an async worker thread.

pub mod catalog;
pub mod chain_links;
pub mod devices;
pub mod journal_audit;
pub mod ledger;
pub mod schema;
pub mod snapshot_pages;
pub mod terminals;

use std::path::Path;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection, RunQueryDsl, SqliteConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use thiserror::Error;

/// Migrations for PostgreSQL, compiled into the binary so a deployed cloud needs no files.
const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations/cloud/postgres");
/// Migrations for embedded SQLite; the same tables as [`PG_MIGRATIONS`] in SQLite's dialect.
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations/cloud/sqlite");

/// Advisory lock key held while migrating PostgreSQL, so two cloud processes starting at once
/// do not both try to create the same tables.
const MIGRATION_LOCK_KEY: i64 = 0x0070_6f73_7379_6e63; // "possync"

/// Which database engine a [`Database`] talks to; a few statements differ between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL: production.
    Postgres,
    /// SQLite: the embedded default.
    Sqlite,
}

/// Failure of the storage layer — the one error type of this boundary. The service maps
/// [`StoreError::Unavailable`] to `POS_SYNC_STORAGE_FAILED` (503, retryable): it always means
/// the transaction rolled back, so nothing of the request is half-stored.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The database could not be reached or could not commit; nothing was half-stored.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A schema migration failed to apply.
    #[error("migration failed: {0}")]
    Migration(String),
    /// The database URL is not `postgres://`, `postgresql://` or `sqlite://PATH`.
    #[error("invalid database url: {0}")]
    InvalidUrl(String),
    /// The caller passed a value the schema cannot hold (e.g. a malformed branch id).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The database refused a row of the transaction — a constraint of the row, or a value it
    /// cannot hold (PostgreSQL's data exceptions) — and rolled the transaction back. Whether
    /// one row is to blame, rather than the database, is for the caller to establish: see
    /// `ingest::commit_isolating`.
    #[error("row refused by the database: {0}")]
    Refused(String),
}

impl From<diesel::result::Error> for StoreError {
    fn from(e: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind as Kind, Error};
        match e {
            // The database's own trouble (a lock it could not get in time, a timeout, a full
            // disk, memory, a shutdown) says nothing about the row: retryable, never a refusal.
            // Checked first because both backends report most of it as `Unknown`.
            Error::DatabaseError(_, ref info) if is_transient(info.message()) => {
                StoreError::Unavailable(info.message().to_string())
            }
            // Data exceptions (SQLSTATE class 22) and triggers' refusals arrive as `Unknown`:
            // diesel does not expose the SQLSTATE. They stay candidates until isolation shows
            // one row failing on its own, twice, while the database answers.
            Error::DatabaseError(
                Kind::CheckViolation | Kind::NotNullViolation | Kind::Unknown,
                info,
            ) => StoreError::Refused(info.message().to_string()),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

/// Fragments of the primary error message (lower-cased) by which SQLite and PostgreSQL report a
/// condition of the database rather than of a row: contention, timeouts, resources, shutdown.
/// Diesel exposes no SQLSTATE and no SQLite result code, so the message is all there is; the
/// list is explicit so that what counts as transient is reviewable (docs/cloud-storage.md).
/// A message that matches none of these and arrives as `Unknown` stays a refusal candidate,
/// which `ingest::commit_isolating` still confirms by a second attempt.
pub const TRANSIENT_MESSAGES: &[&str] = &[
    // SQLite: SQLITE_BUSY / SQLITE_LOCKED (busy timeout elapsed), SQLITE_FULL, SQLITE_IOERR,
    // SQLITE_NOMEM, SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_PROTOCOL, SQLITE_INTERRUPT.
    "database is locked",
    "database table is locked",
    "database schema is locked",
    "database or disk is full",
    "disk i/o error",
    "out of memory",
    "attempt to write a readonly database",
    "unable to open database file",
    "locking protocol",
    "interrupted",
    // SQLITE_CORRUPT / SQLITE_NOTADB: the file, not the row — an operator's matter, and no
    // reason to park a till's sale.
    "database disk image is malformed",
    "file is not a database",
    // PostgreSQL: 40P01, 40001, 57014 (statement/lock timeout, cancel), 55P03, 53xxx
    // (resources), 57P01-57P03 (shutdown, crash recovery), 58030 (I/O), 25006 (hot standby).
    "deadlock detected",
    "out of shared memory",
    "could not serialize access",
    "canceling statement due to",
    "could not obtain lock",
    "lock timeout",
    "statement timeout",
    "no space left on device",
    "could not extend file",
    "could not write to file",
    "could not read block",
    "could not write block",
    "too many connections",
    "remaining connection slots are reserved",
    "terminating connection",
    "the database system is",
    "server closed the connection",
    "cannot execute insert in a read-only transaction",
];

/// Whether a database error message names a transient condition of the database itself
/// ([`TRANSIENT_MESSAGES`]).
pub fn is_transient(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    TRANSIENT_MESSAGES.iter().any(|t| m.contains(t))
}

impl From<diesel::ConnectionError> for StoreError {
    fn from(e: diesel::ConnectionError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// A connection to either backend. Functions in this module take `&mut DbConn` so the service
/// can hold one pooled connection across several calls.
pub enum DbConn {
    /// A PostgreSQL connection.
    Pg(PgConnection),
    /// An SQLite connection.
    Sqlite(SqliteConnection),
}

/// Pooled connection; derefs to [`DbConn`].
pub type PooledConn = diesel::r2d2::PooledConnection<DbConnManager>;

/// r2d2 manager that opens a [`DbConn`] for the configured backend, so the pool is one type
/// whichever database the cloud was started with.
#[derive(Debug, Clone)]
pub struct DbConnManager {
    target: Target,
    options: ConnectOptions,
}

/// How long an SQLite connection waits for another connection's write lock before its
/// statement fails with "database is locked" (answered 503, retryable: see [`is_transient`]).
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// PostgreSQL `statement_timeout` of a serving connection. A statement that hangs (a lock
/// never released, a server that stopped answering mid-commit) would otherwise hold its branch
/// actor in `committing` forever; cancelled, it fails as "canceling statement due to statement
/// timeout", which [`is_transient`] makes a 503 the till retries. Ingest transactions take
/// milliseconds; the longest serving statements (the journal gauges' grouped ledger reads, the
/// tombstone purge) are far below it. `cloud migrate` and the catalog commands run without it
/// ([`ConnectOptions::admin`]), and migrations lift it for their own transaction.
pub const PG_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// libpq TCP keep-alive parameters added to a PostgreSQL URL that names none of its own, so a
/// connection whose server vanished (host down, network cut, no RST) is found dead in about a
/// minute instead of the kernel's two hours (docs/deployment.md).
pub const PG_KEEPALIVE_PARAMS: &str =
    "keepalives=1&keepalives_idle=30&keepalives_interval=10&keepalives_count=3";

/// Per-connection settings of a pool ([`Database::connect_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOptions {
    /// SQLite's `busy_timeout`; [`SQLITE_BUSY_TIMEOUT`] unless a test needs contention fast.
    pub sqlite_busy_timeout: Duration,
    /// PostgreSQL's `statement_timeout`; `None` leaves the server's default (usually none).
    pub pg_statement_timeout: Option<Duration>,
}

impl Default for ConnectOptions {
    /// A serving pool: [`SQLITE_BUSY_TIMEOUT`], [`PG_STATEMENT_TIMEOUT`].
    fn default() -> Self {
        ConnectOptions {
            sqlite_busy_timeout: SQLITE_BUSY_TIMEOUT,
            pg_statement_timeout: Some(PG_STATEMENT_TIMEOUT),
        }
    }
}

impl ConnectOptions {
    /// An operator's command (`cloud migrate`, catalog import and catalog source load): no
    /// statement timeout, since a migration or a large load may legitimately run for long
    /// and an operator is watching it.
    pub fn admin() -> Self {
        ConnectOptions {
            pg_statement_timeout: None,
            ..ConnectOptions::default()
        }
    }
}

/// `url` with [`PG_KEEPALIVE_PARAMS`] appended, unless it already sets any `keepalives*`
/// parameter (the operator's choice is kept whole) or is not a URL libpq reads parameters from.
pub fn with_tcp_keepalives(url: &str) -> String {
    let query = split_query(url).1;
    let has_own = query.is_some_and(|q| {
        q.split('&').any(|p| {
            p.split('=')
                .next()
                .is_some_and(|k| k.starts_with("keepalives"))
        })
    });
    if has_own || url.contains('#') {
        return url.to_string();
    }
    match query {
        None => format!("{url}?{PG_KEEPALIVE_PARAMS}"),
        Some("") => format!("{url}{PG_KEEPALIVE_PARAMS}"),
        Some(_) => format!("{url}&{PG_KEEPALIVE_PARAMS}"),
    }
}

/// Splits a connection URL into what precedes its query and the query (without the `?`).
/// The query starts at the first `?` after the authority's user info: libpq reads a raw `?` in
/// a password (`postgres://u:pa?ss@h/db`) as part of it, since the credentials end at the `@`
/// before the host. The user info is what precedes the last `@` before the path's `/` (or,
/// without a path, the last `@` of the URL).
pub fn split_query(url: &str) -> (&str, Option<&str>) {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[scheme_end..];
    let user_info_end = match rest.find('/') {
        Some(path) => rest[..path].rfind('@'),
        None => rest.rfind('@'),
    }
    .map_or(0, |at| at + 1);
    match rest[user_info_end..].find('?') {
        Some(q) => {
            let at = scheme_end + user_info_end + q;
            (&url[..at], Some(&url[at + 1..]))
        }
        None => (url, None),
    }
}

#[derive(Debug, Clone)]
enum Target {
    Postgres(String),
    Sqlite(String),
}

impl DbConnManager {
    fn open(&self) -> Result<DbConn, diesel::r2d2::Error> {
        match &self.target {
            Target::Postgres(url) => {
                let mut c =
                    PgConnection::establish(url).map_err(diesel::r2d2::Error::ConnectionError)?;
                // Diesel caches prepared statements, and after five runs PostgreSQL may switch
                // one to a generic plan chosen without the parameter values. For key lookups
                // by `= ANY($array)` and `version > $since` that plan can be a full scan: a
                // 1000-entity import batch went from ~5 ms to ~200 ms once the table had
                // statistics. Planning with the actual values costs well under a millisecond.
                c.batch_execute("SET plan_cache_mode = force_custom_plan")
                    .map_err(diesel::r2d2::Error::QueryError)?;
                // The transient conditions are told by their English messages
                // (`TRANSIENT_MESSAGES`): ask for untranslated ones. Only a superuser (or a
                // role granted SET on it) may; otherwise the server's `lc_messages` must be
                // English (docs/cloud-storage.md), and a refusal here changes nothing else.
                if let Err(e) = c.batch_execute("SET lc_messages = 'C'") {
                    tracing::debug!(error = %e, "lc_messages left as the server has it");
                }
                if let Some(t) = self.options.pg_statement_timeout {
                    c.batch_execute(&format!("SET statement_timeout = {}", t.as_millis()))
                        .map_err(diesel::r2d2::Error::QueryError)?;
                }
                Ok(DbConn::Pg(c))
            }
            Target::Sqlite(path) => {
                let mut c = SqliteConnection::establish(path)
                    .map_err(diesel::r2d2::Error::ConnectionError)?;
                // The busy timeout makes a second writer wait instead of failing; NORMAL sync
                // is durable in WAL mode except against power loss of the host, acceptable for
                // the embedded mode. WAL itself was switched on once, before the pool opened
                // (see `Database::connect`).
                c.batch_execute(&format!(
                    "PRAGMA busy_timeout = {}; PRAGMA foreign_keys = ON; \
                     PRAGMA synchronous = NORMAL;",
                    self.options.sqlite_busy_timeout.as_millis()
                ))
                .map_err(diesel::r2d2::Error::QueryError)?;
                Ok(DbConn::Sqlite(c))
            }
        }
    }
}

impl diesel::r2d2::ManageConnection for DbConnManager {
    type Connection = DbConn;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<DbConn, Self::Error> {
        self.open()
    }

    fn is_valid(&self, conn: &mut DbConn) -> Result<(), Self::Error> {
        select_one(conn).map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, _conn: &mut DbConn) -> bool {
        false
    }
}

/// Applies the pending migrations of `source`; returns their names (`<version>_<name>`).
fn apply_pending<DB: diesel::backend::Backend>(
    c: &mut impl MigrationHarness<DB>,
    source: EmbeddedMigrations,
) -> diesel::migration::Result<Vec<String>> {
    let pending = c.pending_migrations(source)?;
    let names = pending.iter().map(|m| m.name().to_string()).collect();
    c.run_migrations(&pending)?;
    Ok(names)
}

pub(crate) fn select_one(conn: &mut DbConn) -> Result<(), diesel::result::Error> {
    match conn {
        DbConn::Pg(c) => diesel::sql_query("SELECT 1").execute(c).map(|_| ()),
        DbConn::Sqlite(c) => diesel::sql_query("SELECT 1").execute(c).map(|_| ()),
    }
}

/// The cloud's database: a pool of connections to one backend. Cheap to clone; every clone
/// shares the pool.
#[derive(Clone)]
pub struct Database {
    pool: diesel::r2d2::Pool<DbConnManager>,
    backend: Backend,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("backend", &self.backend)
            .field("pool", &self.pool.state())
            .finish()
    }
}

impl Database {
    /// Opens a pool of up to `pool_size` connections (two opened at once, the rest on demand). `url` is `postgres://…`, `postgresql://…` or
    /// `sqlite://PATH` (the parent directory and the file are created). Fails if the database
    /// cannot be reached, so a misconfigured cloud stops at start rather than at first request.
    pub fn connect(url: &str, pool_size: u32) -> Result<Database, StoreError> {
        Database::connect_with(url, pool_size, ConnectOptions::default())
    }

    /// [`Database::connect`] with explicit per-connection settings.
    pub fn connect_with(
        url: &str,
        pool_size: u32,
        options: ConnectOptions,
    ) -> Result<Database, StoreError> {
        let (backend, target) = if url.starts_with("postgres://")
            || url.starts_with("postgresql://")
        {
            (
                Backend::Postgres,
                Target::Postgres(with_tcp_keepalives(url)),
            )
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(StoreError::InvalidUrl(
                    "sqlite:// needs a file path, e.g. sqlite:///var/lib/possync/cloud.db".into(),
                ));
            }
            if let Some(parent) = Path::new(path).parent() {
                if !parent.as_os_str().is_empty() {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        StoreError::Unavailable(format!(
                            "cannot create directory {}: {e}",
                            parent.display()
                        ))
                    })?;
                }
            }
            // WAL (readers beside the writer) is a property of the file. Switching to it
            // takes an exclusive lock, and SQLite answers "database is locked" without
            // calling the busy handler when another connection is opening the same fresh
            // file at that moment — which the pool's warm connections did at every first
            // start. So one connection switches it before the pool exists.
            let mut first = SqliteConnection::establish(path)?;
            first
                .batch_execute(&format!(
                    "PRAGMA busy_timeout = {}; PRAGMA journal_mode = WAL;",
                    options.sqlite_busy_timeout.as_millis()
                ))
                .map_err(StoreError::from)?;
            drop(first);
            (Backend::Sqlite, Target::Sqlite(path.to_string()))
        } else {
            let scheme = url.split("://").next().unwrap_or_default();
            return Err(StoreError::InvalidUrl(format!(
                "unsupported scheme {scheme:?}; use postgres://, postgresql:// or sqlite://PATH"
            )));
        };
        let max = pool_size.max(1);
        let pool = diesel::r2d2::Pool::builder()
            .max_size(max)
            // Open connections on demand beyond a warm minimum: many cloud processes (and
            // parallel tests) share one PostgreSQL's connection limit.
            .min_idle(Some(max.min(2)))
            .connection_timeout(Duration::from_secs(10))
            .build(DbConnManager { target, options })
            .map_err(|e| StoreError::Unavailable(format!("cannot open {backend:?} pool: {e}")))?;
        Ok(Database { pool, backend })
    }

    /// The engine behind this pool.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies pending migrations and returns the names of those applied now (empty when the
    /// schema is current). Runs in one transaction — on PostgreSQL under an advisory lock —
    /// so concurrent starters apply each migration once and a failure leaves nothing behind.
    pub fn run_migrations(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn()?;
        let migrate =
            |e: Box<dyn std::error::Error + Send + Sync>| StoreError::Migration(e.to_string());
        match &mut *conn {
            DbConn::Pg(c) => c.transaction(|c| {
                // A migration may rewrite a large table; a serving pool's statement timeout
                // must not cut it off halfway (the transaction would roll back, at every start).
                diesel::sql_query("SET LOCAL statement_timeout = 0").execute(c)?;
                diesel::sql_query(format!(
                    "SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})"
                ))
                .execute(c)?;
                apply_pending(c, PG_MIGRATIONS).map_err(migrate)
            }),
            DbConn::Sqlite(c) => {
                c.immediate_transaction(|c| apply_pending(c, SQLITE_MIGRATIONS).map_err(migrate))
            }
        }
    }

    /// Runs `f` on a pooled connection on the blocking thread pool, never on an async worker:
    /// how the HTTP layer reaches storage. A pool or thread-pool failure arrives as
    /// [`StoreError::Unavailable`], converted into the caller's error type.
    pub async fn run<T, E>(
        &self,
        f: impl FnOnce(&mut DbConn) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = db.conn()?;
            f(&mut conn)
        })
        .await
        .map_err(|e| {
            E::from(StoreError::Unavailable(format!(
                "blocking task failed: {e}"
            )))
        })?
    }

    /// Takes a connection from the pool (waits up to 10 s for a free one).
    pub fn conn(&self) -> Result<PooledConn, StoreError> {
        self.pool
            .get()
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    /// Round-trips `SELECT 1`, for `/readyz`.
    pub fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        select_one(&mut conn).map_err(StoreError::from)
    }
}

/// Instantiates the same query code once per backend: `mod pg` with `Conn = PgConnection`
/// and `mod sqlite` with `Conn = SqliteConnection`. The compiler checks every query against
/// both backends' SQL dialects.
macro_rules! for_each_backend {
    ($($body:tt)*) => {
        mod pg {
            #[allow(unused_imports)]
            use super::*;
            type Conn = diesel::PgConnection;
            $($body)*
        }
        mod sqlite {
            #[allow(unused_imports)]
            use super::*;
            type Conn = diesel::SqliteConnection;
            $($body)*
        }
    };
}
pub(crate) use for_each_backend;

/// Runs `$body` (a block of type `$ret = Result<_, E: From<diesel::result::Error>>`) in a
/// write transaction: a plain transaction on PostgreSQL, `BEGIN IMMEDIATE` on SQLite.
/// Inside the body, `$m` names the backend's query module (`pg` or `sqlite`).
macro_rules! write_txn {
    ($conn:expr, |$c:ident, $m:ident| -> $ret:ty $body:block) => {
        match $conn {
            $crate::db::DbConn::Pg($c) => {
                use self::pg as $m;
                diesel::Connection::transaction($c, |$c| -> $ret { $body })
            }
            $crate::db::DbConn::Sqlite($c) => {
                use self::sqlite as $m;
                $c.immediate_transaction(|$c| -> $ret { $body })
            }
        }
    };
}
pub(crate) use write_txn;

/// Runs `$body` in a read-only transaction that sees one consistent snapshot: REPEATABLE READ
/// on PostgreSQL (a single snapshot for every statement), a deferred transaction on SQLite
/// (WAL gives it a snapshot from its first read).
macro_rules! read_txn {
    ($conn:expr, |$c:ident, $m:ident| -> $ret:ty $body:block) => {
        match $conn {
            $crate::db::DbConn::Pg($c) => {
                use self::pg as $m;
                $c.build_transaction()
                    .repeatable_read()
                    .read_only()
                    .run(|$c| -> $ret { $body })
            }
            $crate::db::DbConn::Sqlite($c) => {
                use self::sqlite as $m;
                diesel::Connection::transaction($c, |$c| -> $ret { $body })
            }
        }
    };
}
pub(crate) use read_txn;

/// Runs `$body` outside any explicit transaction, against whichever backend `$conn` is.
macro_rules! with_conn {
    ($conn:expr, |$c:ident, $m:ident| $body:expr) => {
        match $conn {
            $crate::db::DbConn::Pg($c) => {
                use self::pg as $m;
                $body
            }
            $crate::db::DbConn::Sqlite($c) => {
                use self::sqlite as $m;
                $body
            }
        }
    };
}
pub(crate) use with_conn;

/// Current time as the UTC `NaiveDateTime` the `Timestamp` columns hold.
pub(crate) fn now_utc() -> chrono::NaiveDateTime {
    chrono::Utc::now().naive_utc()
}

#[cfg(test)]
pub(crate) mod test_support;

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [&str; 10] = [
        "2026-11-25-000001_terminals",
        "2026-11-25-000002_catalog",
        "2026-11-25-000003_sales_ledger",
        "2026-11-29-000004_till_identity",
        "2026-11-29-000005_sale_flags",
        "2026-11-29-000006_journal_chain",
        "2026-11-29-000007_catalog_notify",
        "2026-11-29-000010_terminal_contact",
        "2026-11-29-000011_snapshot_page_store",
        "2026-11-29-000012_till_report",
    ];

    #[test]
    fn migrations_apply_once_then_are_a_no_op_on_both_backends() {
        let pg = possync_testkit::pg::TestDatabase::create().expect("PostgreSQL must be reachable");
        let dir = tempfile::tempdir().expect("tempdir");
        let sqlite_url = format!("sqlite://{}/nested/dir/cloud.db", dir.path().display());
        for (url, backend) in [
            (pg.url.as_str(), Backend::Postgres),
            (&sqlite_url, Backend::Sqlite),
        ] {
            let db = Database::connect(url, 2).expect("connect");
            assert_eq!(db.backend(), backend);
            assert_eq!(db.run_migrations().expect("first run"), ALL);
            assert!(db.run_migrations().expect("second run").is_empty());
            db.ping().expect("ping");
            let mut c = db.conn().expect("conn");
            assert_eq!(
                catalog::current_version(&mut c).expect("counter row exists"),
                0
            );
        }
        assert!(dir.path().join("nested/dir/cloud.db").exists());
    }

    #[test]
    fn concurrent_migrators_apply_each_migration_once() {
        let pg = possync_testkit::pg::TestDatabase::create().expect("PostgreSQL must be reachable");
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let url = pg.url.clone();
                std::thread::spawn(move || {
                    Database::connect(&url, 1)
                        .expect("connect")
                        .run_migrations()
                        .expect("migrate")
                })
            })
            .collect();
        let mut applied: Vec<String> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("thread"))
            .collect();
        applied.sort();
        assert_eq!(applied, ALL);
    }

    /// Real primary messages of both backends: the database's own conditions are transient,
    /// what a row cannot hold is not.
    #[test]
    fn transient_conditions_are_told_from_refused_rows_by_their_message() {
        for m in [
            "database is locked",
            "database table is locked: sales_events",
            "database or disk is full",
            "disk I/O error",
            "out of memory",
            "attempt to write a readonly database",
            "deadlock detected",
            "out of shared memory",
            "database disk image is malformed",
            "could not serialize access due to concurrent update",
            "canceling statement due to statement timeout",
            "canceling statement due to lock timeout",
            "canceling statement due to user request",
            "canceling statement due to conflict with recovery",
            "could not obtain lock on row in relation \"sales_events\"",
            "could not extend file \"base/16384/16385\": No space left on device",
            "could not write to file \"pg_wal/xlogtemp.123\": No space left on device",
            "sorry, too many clients already: too many connections",
            "remaining connection slots are reserved for non-replication superuser connections",
            "terminating connection due to administrator command",
            "terminating connection due to idle-in-transaction timeout",
            "the database system is shutting down",
            "the database system is in recovery mode",
            "server closed the connection unexpectedly",
            "cannot execute INSERT in a read-only transaction",
        ] {
            assert!(is_transient(m), "{m:?} must be transient");
        }
        for m in [
            "CHECK constraint failed: local_event_id >= 1",
            "NOT NULL constraint failed: sales_events.payload",
            "new row for relation \"idempotency_ledger\" violates check constraint \"idempotency_ledger_local_event_id_check\"",
            "value too long for type character varying(64)",
            "invalid byte sequence for encoding \"UTF8\": 0x00",
            "integer out of range",
            "date/time field value out of range: \"10000-01-01\"",
            "no space",
        ] {
            assert!(!is_transient(m), "{m:?} is about the row");
        }
    }

    /// The same conditions produced for real: SQLite's write lock held by another connection
    /// beyond the busy timeout, and PostgreSQL's statement timeout, both arrive as
    /// `Unavailable`; a CHECK violation stays `Refused`.
    #[test]
    fn real_lock_and_timeout_errors_are_unavailable_on_both_backends() {
        use diesel::result::Error as DieselError;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("locked.db");
        let path = path.to_str().expect("utf-8 path");
        let mut holder = SqliteConnection::establish(path).expect("open");
        holder
            .batch_execute("PRAGMA journal_mode = WAL; CREATE TABLE t (x INTEGER CHECK (x > 0)); BEGIN IMMEDIATE;")
            .expect("lock");
        let mut waiter = SqliteConnection::establish(path).expect("open");
        waiter
            .batch_execute("PRAGMA busy_timeout = 50;")
            .expect("pragma");
        let locked: DieselError = waiter
            .batch_execute("BEGIN IMMEDIATE;")
            .expect_err("the write lock is held");
        assert!(
            matches!(StoreError::from(locked), StoreError::Unavailable(_)),
            "SQLite busy is retryable"
        );
        holder.batch_execute("COMMIT;").expect("unlock");
        let check: DieselError = waiter
            .batch_execute("INSERT INTO t VALUES (0);")
            .expect_err("CHECK");
        assert!(matches!(StoreError::from(check), StoreError::Refused(_)));

        let pg = possync_testkit::pg::TestDatabase::create().expect("PostgreSQL must be reachable");
        let mut c = PgConnection::establish(&pg.url).expect("connect");
        c.batch_execute("SET statement_timeout = 20").expect("set");
        let timeout: DieselError = c
            .batch_execute("SELECT pg_sleep(2)")
            .expect_err("cancelled by the timeout");
        match StoreError::from(timeout) {
            StoreError::Unavailable(m) => assert!(m.contains("statement timeout"), "{m}"),
            other => panic!("a statement timeout must be retryable: {other:?}"),
        }
    }

    #[test]
    fn keepalives_are_added_to_a_postgres_url_that_names_none() {
        let k = PG_KEEPALIVE_PARAMS;
        assert_eq!(
            with_tcp_keepalives("postgres://h/db"),
            format!("postgres://h/db?{k}")
        );
        assert_eq!(
            with_tcp_keepalives("postgres://h/db?"),
            format!("postgres://h/db?{k}")
        );
        assert_eq!(
            with_tcp_keepalives("postgres://u@h/db?sslmode=require"),
            format!("postgres://u@h/db?sslmode=require&{k}")
        );
        // A raw '?' in the password is part of it (libpq ends the credentials at the '@').
        assert_eq!(
            with_tcp_keepalives("postgres://u:pa?ss@h/db"),
            format!("postgres://u:pa?ss@h/db?{k}")
        );
        assert_eq!(
            with_tcp_keepalives("postgres://u:pa?ss@h/db?sslmode=require"),
            format!("postgres://u:pa?ss@h/db?sslmode=require&{k}")
        );
        assert_eq!(
            split_query("postgres://u:a?b@h?sslmode=require"),
            ("postgres://u:a?b@h", Some("sslmode=require")),
            "no path: the query still starts after the user info"
        );
        assert_eq!(
            split_query("postgres://h/db?user=a@b"),
            ("postgres://h/db", Some("user=a@b"))
        );
        for own in [
            "postgres://h/db?keepalives_idle=5",
            "postgres://h/db?sslmode=require&keepalives=0",
            "postgres://h/db?tcp_user_timeout=1000&keepalives_count=2",
        ] {
            assert_eq!(
                with_tcp_keepalives(own),
                own,
                "the operator's choice is kept"
            );
        }
    }

    /// A serving pool cancels a statement that hangs — here an ingest waiting on a table lock
    /// that is never released in time — and the cancellation is retryable, not a refusal; an
    /// operator's pool has no timeout; a migration waiting longer than the serving timeout
    /// for another migrator still completes.
    #[test]
    fn serving_connections_time_out_hung_statements_and_migrations_do_not() {
        use diesel::connection::SimpleConnection;
        let pg = possync_testkit::pg::TestDatabase::create().expect("PostgreSQL must be reachable");
        let show = |db: &Database| -> String {
            #[derive(diesel::QueryableByName)]
            struct Setting {
                #[diesel(sql_type = diesel::sql_types::Text)]
                statement_timeout: String,
            }
            let mut c = db.conn().expect("conn");
            let DbConn::Pg(c) = &mut *c else { panic!("pg") };
            diesel::sql_query("SHOW statement_timeout")
                .get_result::<Setting>(c)
                .expect("show")
                .statement_timeout
        };
        assert_eq!(
            show(&Database::connect(&pg.url, 1).expect("serving")),
            "30s"
        );
        assert_eq!(
            show(&Database::connect_with(&pg.url, 1, ConnectOptions::admin()).expect("admin")),
            "0"
        );

        let options = ConnectOptions {
            pg_statement_timeout: Some(Duration::from_millis(200)),
            ..ConnectOptions::default()
        };
        // Another migrator holds the migration lock for longer than the statement timeout.
        let mut other = PgConnection::establish(&pg.url).expect("connect");
        other
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY});"
            ))
            .expect("lock");
        let url = pg.url.clone();
        let migrator = std::thread::spawn(move || {
            Database::connect_with(&url, 1, options)
                .expect("connect")
                .run_migrations()
        });
        std::thread::sleep(Duration::from_millis(600));
        other.batch_execute("COMMIT;").expect("unlock");
        let applied = migrator
            .join()
            .expect("thread")
            .expect("the migration waited");
        assert_eq!(applied, ALL);

        // A statement stuck behind a lock is cancelled, as Unavailable.
        let db = Database::connect_with(&pg.url, 1, options).expect("connect");
        other
            .batch_execute("BEGIN; LOCK TABLE idempotency_ledger IN EXCLUSIVE MODE;")
            .expect("lock the ledger");
        let mut c = db.conn().expect("conn");
        let started = std::time::Instant::now();
        let event =
            possync_testkit::sample_sale_event(uuid::Uuid::now_v7(), uuid::Uuid::now_v7(), 1, "b1");
        let hung = ledger::ingest_batch(&mut c, &[ledger::IngestRequest::new(event.clone())]);
        assert!(
            matches!(&hung, Err(StoreError::Unavailable(m)) if m.contains("statement timeout")),
            "{hung:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        other.batch_execute("COMMIT;").expect("unlock");
        let stored = ledger::ingest_batch(&mut c, &[ledger::IngestRequest::new(event)])
            .expect("stored once the lock is gone");
        assert!(matches!(stored[0], ledger::IngestOutcome::Accepted { .. }));
    }

    #[test]
    fn unsupported_urls_are_refused() {
        for url in ["mysql://localhost/x", "sqlite://", "cloud.db", ""] {
            assert!(
                matches!(Database::connect(url, 1), Err(StoreError::InvalidUrl(_))),
                "{url:?}"
            );
        }
    }
}
