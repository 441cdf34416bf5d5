-- One row per idempotency key, forever: the first delivery's payload hash and cloud event id.
CREATE TABLE idempotency_ledger (
    terminal_id    TEXT NOT NULL,
    pos_id         TEXT NOT NULL,
    local_event_id BIGINT NOT NULL CHECK (local_event_id >= 1),
    payload_hash   TEXT NOT NULL,
    cloud_event_id TEXT NOT NULL UNIQUE,
    branch_id      TEXT COLLATE "C" NOT NULL,
    first_seen_at  TIMESTAMP NOT NULL,
    PRIMARY KEY (terminal_id, pos_id, local_event_id)
);

-- Ingested sales, append-only. No column here, or anywhere in this schema, holds stock.
CREATE TABLE sales_events (
    cloud_event_id TEXT PRIMARY KEY,
    terminal_id    TEXT NOT NULL,
    pos_id         TEXT NOT NULL,
    local_event_id BIGINT NOT NULL,
    branch_id      TEXT COLLATE "C" NOT NULL,
    event_type     TEXT NOT NULL CHECK (event_type IN ('sale', 'refund', 'void')),
    occurred_at    TIMESTAMP NOT NULL,
    received_at    TIMESTAMP NOT NULL,
    payload        TEXT NOT NULL,
    payload_hash   TEXT NOT NULL,
    receipt_no     TEXT NOT NULL,
    total_minor    BIGINT NOT NULL,
    currency       TEXT NOT NULL,
    UNIQUE (terminal_id, pos_id, local_event_id)
);
CREATE INDEX sales_events_branch_idx ON sales_events (branch_id, received_at);

-- The database itself refuses to change or remove an ingested sale or a ledger entry.
CREATE FUNCTION possync_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% on % refused: ingested sales are append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END
$$;
CREATE TRIGGER sales_events_append_only BEFORE UPDATE OR DELETE ON sales_events
    FOR EACH ROW EXECUTE FUNCTION possync_refuse_change();
CREATE TRIGGER sales_events_no_truncate BEFORE TRUNCATE ON sales_events
    FOR EACH STATEMENT EXECUTE FUNCTION possync_refuse_change();
CREATE TRIGGER idempotency_ledger_append_only BEFORE UPDATE OR DELETE ON idempotency_ledger
    FOR EACH ROW EXECUTE FUNCTION possync_refuse_change();
CREATE TRIGGER idempotency_ledger_no_truncate BEFORE TRUNCATE ON idempotency_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION possync_refuse_change();
