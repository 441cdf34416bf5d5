DROP TABLE sales_events; DROP TABLE idempotency_ledger;
