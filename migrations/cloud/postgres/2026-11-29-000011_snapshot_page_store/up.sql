-- Snapshot pages encoded once per (branch view, catalog version, cursor, limit), shared by
-- every cloud instance on this database: the first instance to need a page reads the catalog
-- and stores the page here (zstd); the others find it instead of reading the catalog again.
-- A cache, nothing else: UNLOGGED (no WAL; PostgreSQL empties it after a crash and pages are
-- built again on demand), and rows of older catalog versions are deleted whenever a page of a
-- newer version is stored.
CREATE UNLOGGED TABLE snapshot_page_store (
    branch_id TEXT NOT NULL,
    catalog_version BIGINT NOT NULL,
    page_cursor TEXT NOT NULL,
    page_limit INTEGER NOT NULL,
    snapshot_version BIGINT NOT NULL,
    entities INTEGER NOT NULL,
    json_len INTEGER NOT NULL,
    zstd BYTEA NOT NULL,
    stored_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (branch_id, catalog_version, page_cursor, page_limit)
);
CREATE INDEX snapshot_page_store_version ON snapshot_page_store (catalog_version);
