//! Shared parts of the benchmarks (`bench-terminal`, `bench-reconcile`): catalog seeding and
//! transfer, the terminal daemon, enqueue series, statistics.

pub mod catalog;
pub mod daemon;
pub mod enqueue;
pub mod stats;
