ALTER TABLE terminals DROP COLUMN reported_needs_attention;
ALTER TABLE terminals DROP COLUMN reported_catalog_version;
