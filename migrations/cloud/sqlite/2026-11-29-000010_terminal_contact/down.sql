ALTER TABLE terminals DROP COLUMN last_seen_at;
