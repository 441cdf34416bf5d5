-- possync terminal schema, migration 4: running row counts of the sales outbox by state.
-- The outbox reads its counts after every claim and every batch answer, and `/status` and
-- `/metrics` on every request; counting `sync_journal` itself grows with every sale ever
-- synced (synced rows are kept for good). The triggers keep these counts in the same
-- transaction as the row change, so they cannot drift from the table.
CREATE TABLE sync_journal_counts (
    status TEXT PRIMARY KEY NOT NULL,
    n      INTEGER NOT NULL CHECK (n >= 0)
);
INSERT INTO sync_journal_counts (status, n)
SELECT s.status, (SELECT count(*) FROM sync_journal j WHERE j.status = s.status)
FROM (SELECT 'pending' AS status UNION ALL SELECT 'in_flight' UNION ALL SELECT 'failed'
      UNION ALL SELECT 'synced' UNION ALL SELECT 'needs_attention') AS s;

CREATE TRIGGER sync_journal_counts_insert
AFTER INSERT ON sync_journal
BEGIN
    UPDATE sync_journal_counts SET n = n + 1 WHERE status = NEW.status;
END;

CREATE TRIGGER sync_journal_counts_update
AFTER UPDATE OF status ON sync_journal
WHEN OLD.status <> NEW.status
BEGIN
    UPDATE sync_journal_counts SET n = n - 1 WHERE status = OLD.status;
    UPDATE sync_journal_counts SET n = n + 1 WHERE status = NEW.status;
END;

CREATE TRIGGER sync_journal_counts_delete
AFTER DELETE ON sync_journal
BEGIN
    UPDATE sync_journal_counts SET n = n - 1 WHERE status = OLD.status;
END;
