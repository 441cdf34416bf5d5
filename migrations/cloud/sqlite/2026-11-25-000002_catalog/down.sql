DROP TABLE catalog_entities; DROP TABLE catalog_counter;
