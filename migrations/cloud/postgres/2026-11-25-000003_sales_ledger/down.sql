DROP TABLE sales_events; DROP TABLE idempotency_ledger; DROP FUNCTION possync_refuse_change();
