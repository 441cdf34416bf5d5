-- The one cloud-wide catalog version counter. `horizon` is the highest version whose tombstone
-- was purged: a delta cursor below it can no longer learn about that delete.
CREATE TABLE catalog_counter (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL CHECK (version >= 0),
    horizon BIGINT NOT NULL CHECK (horizon >= 0 AND horizon <= version)
);
INSERT INTO catalog_counter (id, version, horizon) VALUES (1, 0, 0);

-- Catalog truth, one row per (type, id); deletes leave a tombstone (deleted = true) until purged.
-- Key columns are COLLATE "C" so ORDER BY and range comparisons are bytewise, as the protocol's
-- "type/id" keys are.
CREATE TABLE catalog_entities (
    entity_type TEXT COLLATE "C" NOT NULL,
    entity_id   TEXT COLLATE "C" NOT NULL,
    branch_id   TEXT COLLATE "C",
    version     BIGINT NOT NULL,
    deleted     BOOLEAN NOT NULL,
    hash        TEXT NOT NULL,
    data        TEXT NOT NULL,
    updated_at  TIMESTAMP NOT NULL,
    PRIMARY KEY (entity_type, entity_id)
);
-- Every change gets its own version, so version identifies one row state (delta order is total).
CREATE UNIQUE INDEX catalog_entities_version_idx ON catalog_entities (version);
CREATE INDEX catalog_entities_branch_key_idx ON catalog_entities (branch_id, entity_type, entity_id);
CREATE INDEX catalog_entities_tombstone_idx ON catalog_entities (updated_at) WHERE deleted;
