-- possync terminal schema, migration 1: the sync engine's tables.
-- Applied inside one transaction by possync_terminal::store::schema; never edit a released
-- migration, add a new numbered file instead.

-- Catalog sync position: catalog_version, snapshot_* progress, last_synced_at.
CREATE TABLE catalog_meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

-- The local copy of the cloud-owned catalog. One row per (type, id); tombstones delete the row.
-- sku / barcode / name_fold are derived from the JSON so lookups work offline through indexes.
CREATE TABLE catalog_entities (
    entity_type         TEXT NOT NULL,
    entity_id           TEXT NOT NULL,
    branch_id           TEXT,
    version             INTEGER NOT NULL,
    deleted             INTEGER NOT NULL DEFAULT 0 CHECK (deleted IN (0, 1)),
    hash                TEXT NOT NULL,
    data                TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    -- generation of the snapshot that last listed this row (catalog_meta.snapshot_generation)
    snapshot_generation INTEGER,
    sku       TEXT GENERATED ALWAYS AS (json_extract(data, '$.sku')) VIRTUAL,
    barcode   TEXT GENERATED ALWAYS AS (json_extract(data, '$.barcode')) VIRTUAL,
    name_fold TEXT GENERATED ALWAYS AS (lower(json_extract(data, '$.name'))) VIRTUAL,
    PRIMARY KEY (entity_type, entity_id)
);
CREATE INDEX catalog_entities_product_sku ON catalog_entities (sku) WHERE entity_type = 'product';
CREATE INDEX catalog_entities_product_barcode ON catalog_entities (barcode) WHERE entity_type = 'product';
CREATE INDEX catalog_entities_product_name ON catalog_entities (name_fold) WHERE entity_type = 'product';

-- Legacy (Google-Drive era) local integer product ids and the cloud ids they turned out to be,
-- matched by SKU when a snapshot or delta brings a product with the same SKU.
CREATE TABLE catalog_id_map (
    legacy_id        INTEGER PRIMARY KEY NOT NULL,
    legacy_entity_id TEXT NOT NULL UNIQUE,
    sku              TEXT,
    cloud_entity_id  TEXT,
    matched_at       TEXT
);
CREATE INDEX catalog_id_map_sku ON catalog_id_map (sku);
CREATE INDEX catalog_id_map_cloud ON catalog_id_map (cloud_entity_id);

-- The sales outbox. pending -> in_flight -> synced | failed (retry later) | needs_attention.
CREATE TABLE sync_journal (
    journal_id         INTEGER PRIMARY KEY,
    pos_id             TEXT NOT NULL,
    local_event_id     INTEGER NOT NULL CHECK (local_event_id >= 1),
    event_type         TEXT NOT NULL CHECK (event_type IN ('sale', 'refund', 'void')),
    event              TEXT NOT NULL,
    status             TEXT NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'in_flight', 'failed', 'synced', 'needs_attention')),
    attempts           INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at    TEXT,
    last_error_code    TEXT,
    last_error_message TEXT,
    cloud_event_id     TEXT,
    created_at         TEXT NOT NULL,
    updated_at         TEXT NOT NULL,
    synced_at          TEXT,
    UNIQUE (pos_id, local_event_id)
);
CREATE INDEX sync_journal_due ON sync_journal (status, next_attempt_at);

-- Once the cloud holds a sale, the local record of that fact is final.
CREATE TRIGGER sync_journal_synced_no_update
BEFORE UPDATE ON sync_journal
WHEN OLD.status = 'synced'
BEGIN
    SELECT RAISE(ABORT, 'sync_journal: a synced row cannot be changed');
END;

CREATE TRIGGER sync_journal_synced_no_delete
BEFORE DELETE ON sync_journal
WHEN OLD.status = 'synced'
BEGIN
    SELECT RAISE(ABORT, 'sync_journal: a synced row cannot be deleted');
END;

-- pos_id, enrollment, next_local_event_id, legacy migration marks.
CREATE TABLE sync_state (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
