//! # possync-terminal
//!
//! The POS daemon: local SQLite store, the sync engine's production ports, the loopback
//! status endpoint and the `terminal` command line.

pub mod store;
