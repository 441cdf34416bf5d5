DROP TABLE IF EXISTS snapshot_page_store;
