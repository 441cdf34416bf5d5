-- When a terminal last called the cloud (any authenticated /v1/pos/* request), for the fleet
-- view (docs/journal-chain.md). Written at most once a minute per terminal and cloud instance,
-- so it is accurate to about a minute; NULL until the terminal's first call after this change.
ALTER TABLE terminals ADD COLUMN last_seen_at TIMESTAMP;
