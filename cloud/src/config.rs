//! Runtime settings of `cloud serve`, gathered in one place so that the CLI, tests and docs
//! agree on every limit and default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use possync_protocol::{DEFAULT_MANIFEST_MAX_ENTRIES, MAX_BODY_BYTES, MAX_EVENTS_PER_REQUEST};

use crate::ingest::IngestSettings;
use crate::rate_limit::RateLimit;

/// Size limits of requests: every one bounds the work a single request can cause.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body, in bytes (1 MiB).
    pub max_body_bytes: usize,
    /// Most events per `POST /v1/pos/sales/events` (500).
    pub max_events: usize,
    /// Most entries per reconcile manifest (2000 by default).
    pub manifest_max_entries: usize,
    /// Longest a request body may take to arrive (30 s by default); then 408.
    pub body_timeout: Duration,
    /// Most snapshot pages this instance builds from the catalog at once
    /// ([`DEFAULT_SNAPSHOT_BUILDS`]); requests for pages held already never wait for it.
    pub snapshot_builds: usize,
}

/// Default bound on snapshot pages built at once per instance: a cold-start herd queues
/// behind two builds instead of taking every pooled connection (and holding every page in
/// memory at once), so ingest and delta polls keep their connections.
pub const DEFAULT_SNAPSHOT_BUILDS: usize = 2;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: MAX_BODY_BYTES,
            max_events: MAX_EVENTS_PER_REQUEST,
            manifest_max_entries: DEFAULT_MANIFEST_MAX_ENTRIES,
            body_timeout: crate::body::DEFAULT_BODY_TIMEOUT,
            snapshot_builds: DEFAULT_SNAPSHOT_BUILDS,
        }
    }
}

/// Rate-limit settings for both kinds of bucket.
#[derive(Debug, Clone)]
pub struct RateLimits {
    /// Per terminal, on `/v1/pos/*`.
    pub terminal: RateLimit,
    /// Per client address, before authentication (all `/v1/*` routes).
    pub address: RateLimit,
    /// Most buckets of each kind kept in memory.
    pub max_buckets: usize,
    /// A bucket unused this long may be evicted.
    pub bucket_idle: Duration,
    /// Proxies whose `Forwarded` / `X-Forwarded-For` name the client (`--trusted-proxies`).
    pub trusted_proxies: crate::client_address::TrustedProxies,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            terminal: RateLimit::default(),
            address: RateLimit::default(),
            max_buckets: 100_000,
            bucket_idle: Duration::from_secs(600),
            trusted_proxies: Default::default(),
        }
    }
}

/// Everything `cloud serve` needs to run.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to bind; port 0 picks a free port (printed on stdout).
    pub bind: String,
    /// `postgres://…` or `sqlite://PATH`.
    pub database_url: String,
    /// Where the embedded database and the generated admin token live.
    pub data_dir: PathBuf,
    /// Database connections in the pool (fixed: the bound on concurrent database work).
    pub pool_size: u32,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// Admin bearer token.
    pub admin_token: String,
    /// Request limits.
    pub limits: Limits,
    /// Rate limits.
    pub rate_limits: RateLimits,
    /// Branch ingestion actors.
    pub ingest: IngestSettings,
    /// Tombstones older than this are purged (and deltas older than the horizon get 410).
    pub tombstone_retention: chrono::Duration,
    /// How often the purge task runs.
    pub purge_interval: Duration,
    /// The catalog-source mapping file, if the catalog comes from the back office's tables.
    pub catalog_source: Option<PathBuf>,
    /// Refuse admin catalog writes (the catalog source is the one source of truth).
    pub catalog_source_only: bool,
    /// Answer empty delta polls from memory (PostgreSQL only; see `catalog_versions`).
    pub delta_from_memory: bool,
}

impl ServeConfig {
    /// Defaults for a data dir and database URL.
    pub fn new(database_url: String, data_dir: PathBuf, admin_token: String) -> Self {
        ServeConfig {
            bind: "127.0.0.1:8080".to_string(),
            database_url,
            data_dir,
            pool_size: 8,
            workers: 0,
            admin_token,
            limits: Limits::default(),
            rate_limits: RateLimits::default(),
            ingest: IngestSettings::default(),
            tombstone_retention: chrono::Duration::days(30),
            purge_interval: Duration::from_secs(3600),
            catalog_source: None,
            catalog_source_only: false,
            delta_from_memory: false,
        }
    }
}

/// The embedded default database of a data dir: `sqlite://<data-dir>/cloud.db`.
pub fn default_database_url(data_dir: &Path) -> String {
    format!("sqlite://{}", data_dir.join("cloud.db").display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_contract() {
        let l = Limits::default();
        assert_eq!(l.max_body_bytes, 1024 * 1024);
        assert_eq!(l.max_events, 500);
        assert_eq!(l.manifest_max_entries, 2000);
        let r = RateLimits::default();
        assert_eq!(r.terminal.per_second, 20);
        assert_eq!(r.terminal.burst, 40);
        assert_eq!(
            default_database_url(Path::new("/d")),
            "sqlite:///d/cloud.db"
        );
    }
}
