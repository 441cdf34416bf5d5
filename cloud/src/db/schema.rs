//! The Diesel schema, one definition for both backends.
//!
//! Portable column types only: ids and UUIDs as `Text` (hyphenated lower-case), timestamps as
//! `Timestamp` holding UTC, JSON as `Text`, versions and money as `BigInt`. The SQL that creates
//! these tables lives in `migrations/cloud/{postgres,sqlite}`, one numbered migration per concern.

diesel::table! {
    /// Enrolled terminals; `token_hash` is the sha256 hex of the bearer token.
    terminals (terminal_id) {
        terminal_id -> Text,
        branch_id -> Text,
        name -> Nullable<Text>,
        token_hash -> Text,
        created_at -> Timestamp,
        revoked_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    /// The single row (`id = 1`) holding the catalog version and the tombstone horizon.
    catalog_counter (id) {
        id -> Integer,
        version -> BigInt,
        horizon -> BigInt,
    }
}

diesel::table! {
    /// Catalog truth: current state (or tombstone) of every entity.
    catalog_entities (entity_type, entity_id) {
        entity_type -> Text,
        entity_id -> Text,
        branch_id -> Nullable<Text>,
        version -> BigInt,
        deleted -> Bool,
        hash -> Text,
        data -> Text,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    /// First delivery of every idempotency key (append-only).
    idempotency_ledger (terminal_id, pos_id, local_event_id) {
        terminal_id -> Text,
        pos_id -> Text,
        local_event_id -> BigInt,
        payload_hash -> Text,
        cloud_event_id -> Text,
        branch_id -> Text,
        first_seen_at -> Timestamp,
    }
}

diesel::table! {
    /// Ingested sales events (append-only).
    sales_events (cloud_event_id) {
        cloud_event_id -> Text,
        terminal_id -> Text,
        pos_id -> Text,
        local_event_id -> BigInt,
        branch_id -> Text,
        event_type -> Text,
        occurred_at -> Timestamp,
        received_at -> Timestamp,
        payload -> Text,
        payload_hash -> Text,
        receipt_no -> Text,
        total_minor -> BigInt,
        currency -> Text,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    terminals,
    catalog_counter,
    catalog_entities,
    idempotency_ledger,
    sales_events,
);
