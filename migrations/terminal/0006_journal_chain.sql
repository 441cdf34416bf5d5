-- possync terminal schema, migration 6: the sales journal's hash chain (docs/journal-chain.md).
--
-- chain_hash  hex SHA-256(prev || canonical event bytes), written in the transaction that
--             enqueues (or carries over) the sale, and sent with it. `prev` is the chain_hash
--             of the row (pos_id, local_event_id - 1), or the pos_id's genesis.
--
-- Rows already in the journal keep chain_hash NULL: nothing is rewritten, and each pos_id's
-- chain starts at its first sale enqueued after this migration (its predecessor is unchained,
-- so its prev is the genesis).
ALTER TABLE sync_journal ADD COLUMN chain_hash TEXT
    CHECK (chain_hash IS NULL OR (length(chain_hash) = 64 AND chain_hash NOT GLOB '*[^0-9a-f]*'));

-- A link, once written, changes only together with the key it links (carry-over re-keys an
-- unsent sale into the current pos_id and chains it there).
CREATE TRIGGER sync_journal_chain_hash_fixed
BEFORE UPDATE OF chain_hash ON sync_journal
WHEN OLD.chain_hash IS NOT NULL
 AND NEW.chain_hash IS NOT OLD.chain_hash
 AND NEW.pos_id = OLD.pos_id AND NEW.local_event_id = OLD.local_event_id
BEGIN
    SELECT RAISE(ABORT, 'sync_journal: a chain_hash changes only with its key');
END;
