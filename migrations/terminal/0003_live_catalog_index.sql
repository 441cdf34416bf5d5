-- possync terminal schema, migration 3: an index over the live (non-tombstone) catalog rows.
-- The entity count on every `/status` and `/metrics` request, and the reconcile manifest, read
-- only live rows; without this index the count scans the whole table (JSON and all) while
-- holding the store's single connection, delaying sales enqueued meanwhile.
CREATE INDEX catalog_entities_live ON catalog_entities (entity_type, entity_id) WHERE deleted = 0;
