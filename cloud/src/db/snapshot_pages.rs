//! The snapshot page store shared by every cloud instance on one PostgreSQL database
//! (`snapshot_page_store`, migration `2026-11-29-000011_snapshot_page_store`).
//!
//! The in-memory page cache (`snapshot_cache`) makes a page one catalog read per instance;
//! this table makes it one per database. A page is a pure function of its key (branch view,
//! catalog version, cursor, limit — see `snapshot_cache`), so whichever instance builds it
//! first stores its zstd form here and every other instance serves those bytes.
//!
//! Coordination is PostgreSQL's own: an advisory lock keyed by the page. An instance that
//! misses the page takes the lock, looks again (someone may have stored it meanwhile), builds
//! and stores it, and unlocks; one that finds the lock taken polls the table until the page
//! appears. The lock only saves work — correctness never depends on it: the stored bytes are
//! the same whoever builds them, and `ON CONFLICT DO NOTHING` keeps the first. So waiting is
//! bounded ([`LOCK_WAIT`]): past it, or if the store cannot be written, the instance builds and
//! serves the page itself. `pg_try_advisory_lock` (never the blocking form) means no request
//! can hang on a lock a broken connection failed to release.
//!
//! Rows of older catalog versions are deleted whenever a page is stored (a request always
//! reads the current version first, so nobody asks for them again), and the table is
//! UNLOGGED: a cache that PostgreSQL may empty after a crash. The embedded SQLite cloud is one
//! process whose memory cache is the only one: it builds directly.

use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Binary, Integer, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use sha2::{Digest, Sha256};

use super::catalog::CatalogError;
use super::DbConn;
use crate::snapshot_cache::{EncodedPage, PageKey};

/// Longest an instance waits for another one building the same page before building it too.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);
/// How often a waiting instance looks for the page another one is building.
const POLL: Duration = Duration::from_millis(10);

/// Where a page came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageOrigin {
    /// Read from the catalog by this call.
    Built,
    /// Found in the shared store (another instance, or an earlier life of this one, built it).
    Shared,
}

#[derive(QueryableByName)]
struct StoredPage {
    #[diesel(sql_type = BigInt)]
    snapshot_version: i64,
    #[diesel(sql_type = Integer)]
    entities: i32,
    #[diesel(sql_type = Integer)]
    json_len: i32,
    #[diesel(sql_type = Binary)]
    zstd: Vec<u8>,
}

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    locked: bool,
}

/// The page under `key` if an instance stored it already (never on SQLite, which has no
/// shared store). Needs no build permit: it is one indexed row.
pub fn find_shared(conn: &mut DbConn, key: &PageKey) -> Result<Option<EncodedPage>, CatalogError> {
    match conn {
        DbConn::Pg(pg) => find(pg, key),
        DbConn::Sqlite(_) => Ok(None),
    }
}

/// The page under `key`: from the shared store when an instance built it already, otherwise
/// built by `build` (under the page's advisory lock, so concurrent instances build it once) and
/// stored for the others.
pub fn get_or_build(
    conn: &mut DbConn,
    key: &PageKey,
    build: impl FnOnce(&mut DbConn) -> Result<EncodedPage, CatalogError>,
) -> Result<(EncodedPage, PageOrigin), CatalogError> {
    let DbConn::Pg(pg) = conn else {
        return Ok((build(conn)?, PageOrigin::Built));
    };
    if let Some(page) = find(pg, key)? {
        return Ok((page, PageOrigin::Shared));
    }
    let lock = lock_id(key);
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        if try_lock(pg, lock)? {
            break;
        }
        std::thread::sleep(POLL);
        if let Some(page) = find(pg, key)? {
            return Ok((page, PageOrigin::Shared));
        }
        if Instant::now() >= deadline {
            tracing::warn!(branchId = %key.branch, catalogVersion = key.catalog_version,
                "snapshot page lock held too long elsewhere; building the page here too");
            return build_and_store(conn, key, build);
        }
    }
    let built = match find(pg, key) {
        Ok(Some(page)) => Ok((page, PageOrigin::Shared)),
        Ok(None) => build_and_store(conn, key, build),
        Err(e) => Err(e),
    };
    let DbConn::Pg(pg) = conn else {
        return built;
    };
    let unlocked = diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<BigInt, _>(lock)
        .execute(pg);
    if let Err(e) = unlocked {
        // The connection is most likely gone (and its lock with it); waiters build after
        // LOCK_WAIT at worst.
        tracing::warn!(error = %e,
            errorCode = %possync_protocol::ErrorCode::PosSyncStorageFailed,
            "releasing a snapshot page lock failed");
    }
    built
}

fn build_and_store(
    conn: &mut DbConn,
    key: &PageKey,
    build: impl FnOnce(&mut DbConn) -> Result<EncodedPage, CatalogError>,
) -> Result<(EncodedPage, PageOrigin), CatalogError> {
    let page = build(conn)?;
    if let DbConn::Pg(pg) = conn {
        if let Err(e) = store(pg, key, &page) {
            // The page is good; only the other instances lose the shortcut.
            tracing::warn!(error = %e, branchId = %key.branch,
                errorCode = %possync_protocol::ErrorCode::PosSyncStorageFailed,
                "storing a snapshot page for the other instances failed");
        }
    }
    Ok((page, PageOrigin::Built))
}

fn find(pg: &mut PgConnection, key: &PageKey) -> Result<Option<EncodedPage>, CatalogError> {
    let rows: Vec<StoredPage> = diesel::sql_query(
        "SELECT snapshot_version, entities, json_len, zstd FROM snapshot_page_store
         WHERE branch_id = $1 AND catalog_version = $2 AND page_cursor = $3 AND page_limit = $4",
    )
    .bind::<Text, _>(&key.branch)
    .bind::<BigInt, _>(key.catalog_version)
    .bind::<Text, _>(key.cursor.as_deref().unwrap_or(""))
    .bind::<Integer, _>(limit_column(key))
    .load(pg)?;
    Ok(rows.into_iter().next().map(|r| {
        EncodedPage::from_zstd(
            r.snapshot_version,
            usize::try_from(r.entities).unwrap_or(0),
            usize::try_from(r.json_len).unwrap_or(0),
            r.zstd,
        )
    }))
}

fn store(pg: &mut PgConnection, key: &PageKey, page: &EncodedPage) -> Result<(), CatalogError> {
    diesel::sql_query("DELETE FROM snapshot_page_store WHERE catalog_version < $1")
        .bind::<BigInt, _>(key.catalog_version)
        .execute(pg)?;
    diesel::sql_query(
        "INSERT INTO snapshot_page_store
             (branch_id, catalog_version, page_cursor, page_limit, snapshot_version, entities,
              json_len, zstd)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
    )
    .bind::<Text, _>(&key.branch)
    .bind::<BigInt, _>(key.catalog_version)
    .bind::<Text, _>(key.cursor.as_deref().unwrap_or(""))
    .bind::<Integer, _>(limit_column(key))
    .bind::<BigInt, _>(page.snapshot_version)
    .bind::<Integer, _>(i32::try_from(page.entities).unwrap_or(i32::MAX))
    .bind::<Integer, _>(i32::try_from(page.json_len).unwrap_or(i32::MAX))
    .bind::<Binary, _>(page.zstd_bytes())
    .execute(pg)?;
    Ok(())
}

fn try_lock(pg: &mut PgConnection, lock: i64) -> Result<bool, CatalogError> {
    let rows: Vec<Locked> = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
        .bind::<BigInt, _>(lock)
        .load(pg)?;
    Ok(rows.first().is_some_and(|r| r.locked))
}

fn limit_column(key: &PageKey) -> i32 {
    i32::try_from(key.limit).unwrap_or(i32::MAX)
}

/// The advisory lock id of a page: the first 8 bytes of SHA-256 over the key, in a namespace
/// of its own (the migration lock is a fixed id; a collision would only make two pages share
/// a lock).
fn lock_id(key: &PageKey) -> i64 {
    let mut h = Sha256::new();
    h.update(b"possync-snapshot-page\0");
    h.update(key.branch.as_bytes());
    h.update([0]);
    h.update(key.catalog_version.to_be_bytes());
    h.update(key.cursor.as_deref().unwrap_or("").as_bytes());
    h.update([0]);
    h.update(key.limit.to_be_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    i64::from_be_bytes(first)
}
