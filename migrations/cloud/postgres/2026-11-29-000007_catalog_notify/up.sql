-- Every change of the catalog counter (a catalog write moves `version`; a tombstone purge moves
-- `horizon`) is announced on channel `possync_catalog` as "VERSION HORIZON", delivered when
-- the writing transaction commits. Each cloud instance LISTENs and keeps its in-memory
-- catalog versions current (cloud/src/catalog_versions.rs), so an empty delta poll needs no
-- query on any instance. A trigger rather than a NOTIFY in the application's write path, so
-- writes by the catalog-source capture triggers are announced too.
CREATE FUNCTION possync_catalog_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('possync_catalog', NEW.version::text || ' ' || NEW.horizon::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER catalog_counter_notify
    AFTER UPDATE ON catalog_counter
    FOR EACH ROW
    WHEN (OLD.version IS DISTINCT FROM NEW.version OR OLD.horizon IS DISTINCT FROM NEW.horizon)
    EXECUTE FUNCTION possync_catalog_notify();
