//! # possync-cloud
//!
//! The cloud side of possync: catalog snapshot, delta and reconcile, and exactly-once sales
//! ingestion behind terminal authentication, branch scoping and rate limits.

pub mod db;
