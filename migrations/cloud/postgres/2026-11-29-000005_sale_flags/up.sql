-- What was odd but storable about a stored sale (a till clock far off, a discount above its
-- line): one row per flag. Sales are facts; they are stored and flagged, never refused for it.
-- Written in the transaction that stores the sale, and append-only like it.
CREATE TABLE sales_event_flags (
    cloud_event_id TEXT NOT NULL REFERENCES sales_events (cloud_event_id),
    flag           TEXT NOT NULL,
    PRIMARY KEY (cloud_event_id, flag)
);
CREATE INDEX sales_event_flags_flag_idx ON sales_event_flags (flag);

CREATE TRIGGER sales_event_flags_append_only BEFORE UPDATE OR DELETE ON sales_event_flags
    FOR EACH ROW EXECUTE FUNCTION possync_refuse_change();
CREATE TRIGGER sales_event_flags_no_truncate BEFORE TRUNCATE ON sales_event_flags
    FOR EACH STATEMENT EXECUTE FUNCTION possync_refuse_change();
