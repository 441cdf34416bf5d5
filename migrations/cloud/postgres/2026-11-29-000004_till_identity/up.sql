-- Till identity (issue 14): token rotation with an optional grace period, the device each
-- pos_id is bound to (clone detection), and the per-pos lookup of held keys.

-- The token a rotation replaced keeps working until previous_token_expires_at (the grace);
-- NULL when there was no grace or it has been replaced again. Only hashes are stored.
ALTER TABLE terminals ADD COLUMN previous_token_hash TEXT;
ALTER TABLE terminals ADD COLUMN previous_token_expires_at TIMESTAMP;
CREATE UNIQUE INDEX terminals_previous_token_idx ON terminals (previous_token_hash);

-- The first device (x-device-nonce) that delivered sales for a pos_id owns it for good: a
-- second device with the same pos_id is a cloned disk or a restored backup and is told to fork.
CREATE TABLE pos_devices (
    pos_id        TEXT PRIMARY KEY,
    terminal_id   TEXT NOT NULL,
    device_nonce  TEXT NOT NULL,
    first_seen_at TIMESTAMP NOT NULL
);

-- GET /v1/pos/sales/held reads the keys of one pos_id across terminals.
CREATE INDEX idempotency_ledger_pos_idx ON idempotency_ledger (pos_id, local_event_id);
