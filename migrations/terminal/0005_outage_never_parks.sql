-- possync terminal schema, migration 5: an outage never parks a sale.
--
-- Until this version every failed delivery counted toward `max_attempts`, so an outage longer
-- than the backoff budget (~18 minutes with the defaults) moved the sales in flight to
-- `needs_attention` with POS_SYNC_ATTEMPTS_EXHAUSTED, where they waited for an operator.
-- From now on only failures blamed on the sale itself count (see the outbox's blame_sale):
--   answered_failures  attempts the cloud answered with a retryable error of its own; a sale
--                      with any goes alone in its next request
--   sale_failures      failures pinned on the sale (failed alone while the cloud stored others);
--                      the only ones that use up max_attempts
--   last_failed_at     when the last failed attempt came back (RFC 3339 UTC)
ALTER TABLE sync_journal ADD COLUMN answered_failures INTEGER NOT NULL DEFAULT 0
    CHECK (answered_failures >= 0);
ALTER TABLE sync_journal ADD COLUMN sale_failures INTEGER NOT NULL DEFAULT 0
    CHECK (sale_failures >= 0);
ALTER TABLE sync_journal ADD COLUMN last_failed_at TEXT;

-- Release the sales an earlier version parked for want of an answer. The old outbox gave up
-- only on retryable whole-request failures, and wrote the last one into the message as
-- "last error <CODE>: ..."; every such code is the cloud's trouble (no answer, a proxy's or the
-- cloud's 5xx, a throttle, a garbled answer), none is the sale's. The rows go back to
-- `pending` (the cloud's idempotency ledger makes the resend safe); their attempt count and
-- last error stay as history; nothing else is touched.
UPDATE sync_journal
SET status = 'pending', next_attempt_at = NULL
WHERE status = 'needs_attention'
  AND last_error_code = 'POS_SYNC_ATTEMPTS_EXHAUSTED'
  AND (last_error_message LIKE '%last error NETWORK:%'
       OR last_error_message LIKE '%last error BAD_RESPONSE:%'
       OR last_error_message LIKE '%last error HTTP\_%' ESCAPE '\'
       OR last_error_message LIKE '%last error POS_SYNC_RATE_LIMITED:%'
       OR last_error_message LIKE '%last error POS_SYNC_STORAGE_FAILED:%'
       OR last_error_message LIKE '%last error POS_CATALOG_%');
