DROP TABLE sales_chain_links;
DROP INDEX sales_events_pos_idx;
ALTER TABLE sales_events DROP COLUMN chain_hash;
