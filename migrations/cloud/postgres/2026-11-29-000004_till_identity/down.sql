DROP INDEX idempotency_ledger_pos_idx;
DROP TABLE pos_devices;
DROP INDEX terminals_previous_token_idx;
ALTER TABLE terminals DROP COLUMN previous_token_expires_at;
ALTER TABLE terminals DROP COLUMN previous_token_hash;
