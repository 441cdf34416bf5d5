//! # possync-cloud
//!
//! The cloud side of possync: catalog snapshot, delta and reconcile, and exactly-once sales
//! ingestion behind terminal authentication, branch scoping and rate limits.
//!
//! Layout: [`app`] builds the actix-web application (used by `cloud serve` and by in-process
//! tests); [`auth`], [`rate_limit`] and [`error`] are the request boundary; the route modules
//! hold handlers; [`ingest`] holds the per-branch ingestion actors with group commit; [`db`]
//! is storage (Diesel, PostgreSQL or SQLite); [`cli`] and [`server`] run the binary.
//!
//! What lets several instances serve a fleet from one PostgreSQL database without a cluster
//! layer of their own: [`catalog_versions`] answers empty delta polls from memory, kept current
//! by `LISTEN/NOTIFY`; [`snapshot_cache`] holds snapshot pages encoded once, and
//! `db::snapshot_pages` shares them between instances through an UNLOGGED table under an
//! advisory lock per page; `db::ledger::recheck_links` verifies the journal-chain links two
//! instances' concurrent transactions could not see. Everything else an instance keeps in
//! memory (rate-limit buckets, branch actors, last-contact throttling) is per instance by
//! design and documented where it lives.

#![warn(missing_docs)]

pub mod admin_routes;
pub mod app;
pub mod auth;
pub mod body;
pub mod catalog_routes;
pub mod catalog_source;
pub mod catalog_versions;
pub mod cli;
pub mod client_address;
pub mod config;
pub mod db;
pub mod error;
pub mod fingerprint_cache;
pub mod fleet_page;
pub mod ingest;
pub mod metrics;
pub mod rate_limit;
pub mod sales_routes;
pub mod server;
pub mod snapshot_cache;
pub mod telemetry;
