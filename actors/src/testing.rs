//! Test support: in-memory store, scriptable cloud, manual clock (being written).
