-- The sales journal's hash chain (docs/journal-chain.md, docs/cloud-storage.md).
-- chain_hash: what the till sent (NULL for sales recorded before the till chained them).
ALTER TABLE sales_events ADD COLUMN chain_hash TEXT;
-- A link is verified against the event (pos_id, local_event_id - 1), under any terminal.
CREATE INDEX sales_events_pos_idx ON sales_events (pos_id, local_event_id);

-- One row per verified link, written in the transaction that stores the second of its two
-- ends (the event or its predecessor, whichever arrives later). A stored chained event with
-- no row here waits for its predecessor. intact = false is a chain break: the event is kept
-- (the journal is evidence) and the break is recorded here, append-only like the sale.
CREATE TABLE sales_chain_links (
    cloud_event_id TEXT PRIMARY KEY REFERENCES sales_events (cloud_event_id),
    branch_id      TEXT COLLATE "C" NOT NULL,
    pos_id         TEXT NOT NULL,
    local_event_id BIGINT NOT NULL,
    intact         BOOLEAN NOT NULL,
    expected_hash  TEXT NOT NULL,
    verified_at    TIMESTAMP NOT NULL
);
CREATE INDEX sales_chain_links_breaks_idx ON sales_chain_links (branch_id) WHERE NOT intact;

CREATE TRIGGER sales_chain_links_append_only BEFORE UPDATE OR DELETE ON sales_chain_links
    FOR EACH ROW EXECUTE FUNCTION possync_refuse_change();
CREATE TRIGGER sales_chain_links_no_truncate BEFORE TRUNCATE ON sales_chain_links
    FOR EACH STATEMENT EXECUTE FUNCTION possync_refuse_change();
