DROP TRIGGER IF EXISTS catalog_counter_notify ON catalog_counter;
DROP FUNCTION IF EXISTS possync_catalog_notify();
