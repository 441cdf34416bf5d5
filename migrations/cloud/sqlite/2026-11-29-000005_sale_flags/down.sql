DROP TABLE sales_event_flags;
