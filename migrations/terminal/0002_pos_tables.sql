-- possync terminal schema, migration 2: the till's own records. The sync engine reads `sales`
-- through the journal and never writes either table.

-- Every receipt this terminal rang up (and, after a legacy migration, the receipts of the old
-- layout). Append-only: receipts are never edited or removed.
CREATE TABLE sales (
    sale_id        INTEGER PRIMARY KEY,
    pos_id         TEXT NOT NULL,
    -- NULL only for legacy receipts that the old Drive sync had already delivered.
    local_event_id INTEGER CHECK (local_event_id IS NULL OR local_event_id >= 1),
    event_type     TEXT NOT NULL CHECK (event_type IN ('sale', 'refund', 'void')),
    receipt_no     TEXT NOT NULL,
    currency       TEXT NOT NULL,
    total_minor    INTEGER NOT NULL,
    payload        TEXT NOT NULL,
    occurred_at    TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    source         TEXT NOT NULL DEFAULT 'pos' CHECK (source IN ('pos', 'legacy')),
    legacy_sale_id INTEGER UNIQUE,
    UNIQUE (pos_id, local_event_id)
);
CREATE INDEX sales_receipt_no ON sales (receipt_no);

CREATE TRIGGER sales_no_update
BEFORE UPDATE ON sales
BEGIN
    SELECT RAISE(ABORT, 'sales: receipts are append-only');
END;

CREATE TRIGGER sales_no_delete
BEFORE DELETE ON sales
BEGIN
    SELECT RAISE(ABORT, 'sales: receipts are append-only');
END;

-- Stock as the branch counts it. Owned by the branch POS; sync never writes it.
CREATE TABLE local_inventory (
    product_id TEXT PRIMARY KEY NOT NULL,
    qty        INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);
