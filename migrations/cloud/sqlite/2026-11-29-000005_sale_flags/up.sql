-- What was odd but storable about a stored sale (a till clock far off, a discount above its
-- line): one row per flag. Sales are facts; they are stored and flagged, never refused for it.
-- Written in the transaction that stores the sale, and append-only like it.
CREATE TABLE sales_event_flags (
    cloud_event_id TEXT NOT NULL REFERENCES sales_events (cloud_event_id),
    flag           TEXT NOT NULL,
    PRIMARY KEY (cloud_event_id, flag)
);
CREATE INDEX sales_event_flags_flag_idx ON sales_event_flags (flag);

CREATE TRIGGER sales_event_flags_no_update BEFORE UPDATE ON sales_event_flags
BEGIN SELECT RAISE(ABORT, 'UPDATE on sales_event_flags refused: ingested sales are append-only'); END;
CREATE TRIGGER sales_event_flags_no_delete BEFORE DELETE ON sales_event_flags
BEGIN SELECT RAISE(ABORT, 'DELETE on sales_event_flags refused: ingested sales are append-only'); END;
