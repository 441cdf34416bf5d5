//! Running `cloud serve`: open and migrate the database, bind, announce the address, serve
//! until SIGINT/SIGTERM, and stop the background tasks with the server.

use std::io::Write;
use std::sync::Arc;

use actix_web::{web, HttpServer};
use thiserror::Error;

use crate::app::{self, AppState};
use crate::config::ServeConfig;
use crate::db::{catalog, Database, StoreError};
use crate::metrics::Metrics;

/// Why the server could not start or stopped abnormally.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The database could not be opened or migrated.
    #[error("{code}: {0}", code = possync_protocol::ErrorCode::PosSyncStorageFailed)]
    Store(#[from] StoreError),
    /// The catalog source is unusable (SQLite cloud, bad mapping, capture not installed).
    #[error("{0}")]
    CatalogSource(#[from] crate::catalog_source::SourceError),
    /// Binding or serving failed (address in use, permission…).
    #[error("cannot serve on {bind}: {source}")]
    Io {
        /// The requested bind address.
        bind: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Opens the database and applies pending migrations, off the async threads.
pub async fn open_database(url: &str, pool_size: u32) -> Result<Database, StoreError> {
    let url = url.to_string();
    web::block(move || {
        let db = Database::connect(&url, pool_size)?;
        let applied = db.run_migrations()?;
        if !applied.is_empty() {
            tracing::info!(migrations = ?applied, "migrations applied");
        }
        Ok(db)
    })
    .await
    .map_err(|e| StoreError::Unavailable(e.to_string()))?
}

/// Runs the server until a shutdown signal. Prints `listening on http://ADDR` (one line, on
/// stdout) once bound, which is what scripts and tests wait for.
pub async fn run(config: ServeConfig) -> Result<(), ServeError> {
    let db = open_database(&config.database_url, config.pool_size).await?;
    let metrics = Metrics::new();
    let state: Arc<AppState> = AppState::new(
        db.clone(),
        metrics.clone(),
        &config.admin_token,
        config.limits,
        config.rate_limits,
        config.ingest,
    );
    if let Some(path) = &config.catalog_source {
        let source = check_catalog_source(&db, path).await?;
        tracing::info!(
            mapping = %path.display(),
            entities = source.entities.len(),
            only = config.catalog_source_only,
            "catalog source: capture installed and current"
        );
        if config.catalog_source_only {
            let _ = state.catalog_source_only.set(path.display().to_string());
        }
    }
    if config.delta_from_memory && db.backend() == crate::db::Backend::Postgres {
        crate::catalog_versions::listen(
            state.catalog_versions.clone(),
            config.database_url.clone(),
            metrics.clone(),
        );
    }
    let app_state = state.clone();
    // Slow clients: the request head must arrive within 5 s (else a bare 408 from actix and
    // the connection closes); the body within `--body-timeout-secs` (else 408 with the
    // envelope, see `body::read_limited`); a closing connection gets 1 s to drain.
    let mut server = HttpServer::new(move || app::build(app_state.clone()))
        .client_request_timeout(std::time::Duration::from_secs(5))
        .client_disconnect_timeout(std::time::Duration::from_secs(1));
    if config.workers > 0 {
        server = server.workers(config.workers);
    }
    let server = server.bind(&config.bind).map_err(|source| ServeError::Io {
        bind: config.bind.clone(),
        source,
    })?;
    let addrs = server.addrs();
    let running = server.run();
    for addr in &addrs {
        println!("listening on http://{addr}");
    }
    let _ = std::io::stdout().flush();
    tracing::info!(addrs = ?addrs, database = %db_kind(&db), "cloud serving");

    let purge = actix_web::rt::spawn(purge_tombstones(
        db,
        metrics,
        config.tombstone_retention,
        config.purge_interval,
    ));
    let recheck =
        actix_web::rt::spawn(recheck_chain_links(state.db.clone(), state.metrics.clone()));
    let sweep_state = state.clone();
    let sweep = actix_web::rt::spawn(async move {
        let mut tick = actix_web::rt::time::interval(std::time::Duration::from_secs(60));
        loop {
            tick.tick().await;
            sweep_state.address_buckets.sweep();
            sweep_state.terminal_buckets.sweep();
        }
    });

    let result = running.await;
    purge.abort();
    sweep.abort();
    recheck.abort();
    tracing::info!("cloud stopped");
    result.map_err(|source| ServeError::Io {
        bind: config.bind,
        source,
    })
}

/// How often each instance re-checks chain links that ingestion left unverified.
pub const LINK_RECHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// How far back the re-check looks: links left unverified come from concurrent transactions
/// of two live instances (both ends stored within moments of each other), so ten minutes cover
/// the passes a restart or two may miss, while a pass reads only the last ten minutes of sales
/// (about 100 000 rows for 10 000 tills selling once a minute, by primary key range).
const LINK_RECHECK_WINDOW: chrono::Duration = chrono::Duration::minutes(10);
/// Events younger than this are left to ingestion (their other end may be committing now).
const LINK_RECHECK_SETTLE: chrono::Duration = chrono::Duration::seconds(5);
/// Most events one pass verifies (the next pass continues).
const LINK_RECHECK_LIMIT: i64 = 1000;

/// Every [`LINK_RECHECK_EVERY`], verifies the chain links ingestion left unverified among the
/// events stored in the last [`LINK_RECHECK_WINDOW`] (`ledger::recheck_links`;
/// docs/cloud-storage.md).
async fn recheck_chain_links(db: Database, metrics: Metrics) {
    let mut tick = actix_web::rt::time::interval(LINK_RECHECK_EVERY);
    loop {
        tick.tick().await;
        let now = chrono::Utc::now();
        let (from, to) = (now - LINK_RECHECK_WINDOW, now - LINK_RECHECK_SETTLE);
        match db
            .run(move |conn| crate::db::ledger::recheck_links(conn, from, to, LINK_RECHECK_LIMIT))
            .await
        {
            Ok(v) if v.is_empty() => {}
            Ok(v) => {
                metrics.chain_links_rechecked.inc_by(v.len() as u64);
                tracing::info!(
                    verified = v.len(),
                    broken = v.iter().filter(|l| !l.intact).count(),
                    "chain links verified by the re-check"
                );
            }
            Err(e) => tracing::warn!(error = %e,
                errorCode = %possync_protocol::ErrorCode::PosSyncStorageFailed,
                "chain link re-check failed; the next pass tries again"),
        }
    }
}

/// Parses the mapping, checks it against the database and verifies its capture triggers are
/// the installed ones: a cloud never serves a catalog that silently stopped following the
/// back office.
async fn check_catalog_source(
    db: &Database,
    path: &std::path::Path,
) -> Result<crate::catalog_source::CheckedSource, crate::catalog_source::SourceError> {
    use crate::catalog_source::{capture, inspect, SourceError, SourceMapping};
    let mapping = SourceMapping::from_file(path)?;
    db.run(move |conn| {
        let crate::db::DbConn::Pg(c) = conn else {
            return Err(SourceError::NeedsPostgres);
        };
        let checked = inspect::check(c, &mapping)?;
        capture::verify_installed(c, &checked)?;
        Ok(checked)
    })
    .await
}

fn db_kind(db: &Database) -> &'static str {
    match db.backend() {
        crate::db::Backend::Postgres => "postgres",
        crate::db::Backend::Sqlite => "sqlite",
    }
}

/// Background task: every `interval`, deletes tombstones older than `retention` (which raises
/// the delta horizon; older cursors then get 410 `resnapshot_required`).
async fn purge_tombstones(
    db: Database,
    metrics: Metrics,
    retention: chrono::Duration,
    interval: std::time::Duration,
) {
    let mut tick = actix_web::rt::time::interval(interval);
    loop {
        tick.tick().await;
        match db
            .run(move |conn| catalog::purge_tombstones(conn, retention))
            .await
        {
            Ok(n) => {
                metrics.tombstones_purged.inc_by(n as u64);
                if n > 0 {
                    tracing::info!(purged = n, "tombstones purged");
                }
            }
            Err(e) => tracing::warn!(error = %e, "tombstone purge failed"),
        }
    }
}
