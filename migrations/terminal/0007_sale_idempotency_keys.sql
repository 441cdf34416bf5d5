-- possync terminal schema, migration 7: idempotency keys of `POST /sales` (docs/local-schema.md).
--
-- idempotency_key  the POS client's `Idempotency-Key` header (1-255 printable ASCII), NULL for
--                  a sale recorded without one (the CLI, legacy receipts, every sale before
--                  this migration).
-- request_hash     hex SHA-256 of the canonical request the key first recorded (type, payload,
--                  occurred_at when the client gave it); a retry must match it to be answered
--                  with the original receipt.
--
-- Both are written in the INSERT of the sale itself (the append-only triggers of `sales` stay
-- as they are) and kept for as long as the receipt: a sale is a fact, and so is the key that
-- recorded it. The unique index is partial, so the sales without a key cost it nothing.
ALTER TABLE sales ADD COLUMN idempotency_key TEXT
    CHECK (idempotency_key IS NULL OR (length(idempotency_key) BETWEEN 1 AND 255
                                       AND idempotency_key NOT GLOB '*[^ -~]*'));
ALTER TABLE sales ADD COLUMN request_hash TEXT
    CHECK ((request_hash IS NULL) = (idempotency_key IS NULL)
           AND (request_hash IS NULL OR (length(request_hash) = 64
                                         AND request_hash NOT GLOB '*[^0-9a-f]*')));
CREATE UNIQUE INDEX sales_idempotency_key ON sales (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
