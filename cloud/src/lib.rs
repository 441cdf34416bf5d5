//! # possync-cloud
//!
//! The cloud side of possync: catalog snapshot, delta and reconcile, and exactly-once sales
//! ingestion behind terminal authentication, branch scoping and rate limits.
//!
//! Layout: [`app`] builds the actix-web application (used by `cloud serve` and by in-process
//! tests); [`auth`], [`rate_limit`] and [`error`] are the request boundary; the route modules
//! hold handlers; [`ingest`] holds the per-branch ingestion actors with group commit; [`db`]
//! is storage (Diesel, PostgreSQL or SQLite); [`cli`] and [`server`] run the binary.

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
