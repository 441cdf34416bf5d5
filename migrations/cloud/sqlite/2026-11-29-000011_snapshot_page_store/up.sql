-- Kept in step with the PostgreSQL migration of the same name, which creates the snapshot
-- page store shared by several cloud instances on one database. The embedded SQLite cloud is
-- one process: its in-memory page cache is already the only one, so there is nothing to
-- create here.
SELECT 1;
