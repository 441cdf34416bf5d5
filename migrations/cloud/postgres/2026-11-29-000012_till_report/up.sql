-- What a till last reported about itself with its requests (headers x-possync-catalog-version
-- and x-possync-needs-attention), written beside last_seen_at (at most once a minute per
-- terminal and instance): the fleet view's "catalog versions behind" and "needs attention".
-- NULL: the till has not reported it (an older till, or none since this migration).
ALTER TABLE terminals ADD COLUMN reported_catalog_version BIGINT;
ALTER TABLE terminals ADD COLUMN reported_needs_attention BIGINT;
