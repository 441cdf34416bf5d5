//! Cloud storage: one Diesel schema served by PostgreSQL (production) or SQLite (embedded),
//! behind a connection pool.
//!
//! Every function here is blocking. The HTTP layer calls them inside `web::block` /
//! `spawn_blocking`, never on an async worker thread.

pub mod catalog;
pub mod ledger;
pub mod schema;
pub mod terminals;

use thiserror::Error;

/// Which database engine a [`Database`] talks to; a few statements differ between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// Failure of the storage layer. Mapped once, by the service, to `POS_SYNC_STORAGE_FAILED`
/// (503, retryable) for [`StoreError::Unavailable`].
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
}

/// A connection to either backend. Query bodies are written once and run against both via
/// [`with_conn!`], so each body is type-checked per backend.
pub enum DbConn {
    Pg(diesel::PgConnection),
    Sqlite(diesel::SqliteConnection),
}

/// Pooled connection; derefs to [`DbConn`].
pub type PooledConn = diesel::r2d2::PooledConnection<DbConnManager>;

/// r2d2 manager that opens a [`DbConn`] for the configured backend.
#[derive(Debug, Clone)]
pub struct DbConnManager {
    backend: Backend,
    url: String,
}

/// The cloud's database: a pool of connections to one backend. Cheap to clone.
#[derive(Clone)]
pub struct Database {
    pool: diesel::r2d2::Pool<DbConnManager>,
    backend: Backend,
}

impl Database {
    /// Opens a pool. `url` is `postgres://…`, `postgresql://…` or `sqlite://PATH` (the parent
    /// directory and the file are created).
    pub fn connect(_url: &str, _pool_size: u32) -> Result<Database, StoreError> {
        todo!()
    }

    /// The engine behind this pool.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies pending migrations; returns the names of those applied now.
    pub fn run_migrations(&self) -> Result<Vec<String>, StoreError> {
        todo!()
    }

    /// Takes a connection from the pool.
    pub fn conn(&self) -> Result<PooledConn, StoreError> {
        self.pool
            .get()
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    /// Round-trips `SELECT 1`, for `/readyz`.
    pub fn ping(&self) -> Result<(), StoreError> {
        todo!()
    }
}

impl diesel::r2d2::ManageConnection for DbConnManager {
    type Connection = DbConn;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<DbConn, Self::Error> {
        todo!()
    }

    fn is_valid(&self, _conn: &mut DbConn) -> Result<(), Self::Error> {
        todo!()
    }

    fn has_broken(&self, _conn: &mut DbConn) -> bool {
        false
    }
}
