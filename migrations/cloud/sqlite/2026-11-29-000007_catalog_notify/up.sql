-- Kept in step with the PostgreSQL migration of the same name, which announces catalog
-- counter changes to every cloud instance (LISTEN/NOTIFY). The embedded SQLite cloud has no
-- such channel: its delta polls always read the file (a local query, no network round trip),
-- so there is nothing to create here.
SELECT 1;
