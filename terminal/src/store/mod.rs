//! The terminal's local SQLite store (being built).
