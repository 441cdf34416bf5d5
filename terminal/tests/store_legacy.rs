//! The legacy Google Drive era database migrated in place: backup, nothing lost, sales queued
//! or flagged, Drive tables retired, legacy ids mapped to cloud ids by SKU after a snapshot.

mod fixtures;

use chrono::Utc;
use fixtures::legacy::LegacyFixture;
use fixtures::*;
use possync_actors::LocalStore;
use possync_protocol::{validate_event, EventType, SnapshotPage};
use possync_terminal::store::schema::table_exists;
use possync_terminal::store::{
    migrate_legacy, CatalogQuery, JournalStatus, LegacyOutcome, SqliteStore, TerminalStoreError,
};

#[test]
fn the_sample_legacy_database_is_migrated_with_nothing_lost() {
    let (_dir, path) = temp_db();
    let fixture = LegacyFixture::sample();
    fixture.write(&path).expect("write legacy");
    let legacy_products = dump(&path, "products");
    let legacy_sales = dump(&path, "sales");
    let legacy_drive = dump(&path, "drive_sync_state");

    let (store, report) = SqliteStore::open_with_report(&path).expect("open migrates");
    let legacy = report.legacy.expect("legacy converted on open");
    assert_eq!(legacy.outcome, LegacyOutcome::Migrated);

    // the backup is the untouched legacy file
    let backup = report.backup_path.expect("backup");
    assert!(
        backup.to_string_lossy().ends_with("-v0"),
        "{}",
        backup.display()
    );
    assert_eq!(legacy.backup_path.as_ref(), Some(&backup));
    assert_eq!(dump(&backup, "products"), legacy_products);
    assert_eq!(dump(&backup, "sales"), legacy_sales);
    assert_eq!(dump(&backup, "drive_sync_state"), legacy_drive);

    // retired, not deleted: the old tables keep every row under legacy_* names
    let conn = raw(&path);
    for t in ["drive_sync_state", "drive_upload_log", "products"] {
        assert!(!table_exists(&conn, t).expect("q"), "{t} still live");
    }
    assert_eq!(
        legacy.retired_tables,
        vec![
            "legacy_drive_sync_state",
            "legacy_drive_upload_log",
            "legacy_products",
            "legacy_sales"
        ]
    );
    assert_eq!(dump(&path, "legacy_products"), legacy_products);
    assert_eq!(dump(&path, "legacy_sales"), legacy_sales);
    assert_eq!(dump(&path, "legacy_drive_sync_state"), legacy_drive);
    assert_eq!(count(&path, "legacy_drive_upload_log"), fixture.uploads);

    // products: one catalog entity, one id-map row, one stock row each
    let n_products = fixture.products.len() as i64;
    assert_eq!(legacy.products, n_products);
    assert_eq!(
        count(
            &path,
            "catalog_entities WHERE entity_id LIKE 'legacy-%' AND version = 0"
        ),
        n_products
    );
    assert_eq!(
        count(&path, "catalog_id_map WHERE cloud_entity_id IS NULL"),
        n_products
    );
    assert_eq!(legacy.inventory_rows, n_products);
    for p in &fixture.products {
        let id = format!("legacy-{}", p.id);
        assert_eq!(
            store.local_inventory(&id).expect("stock"),
            Some(p.stock),
            "{id}"
        );
    }
    let mug = store
        .lookup(CatalogQuery::Sku("SKU-MUG".into()))
        .expect("lookup");
    assert_eq!(mug.len(), 1);
    assert_eq!(
        (mug[0].id.as_str(), mug[0].data["price_minor"].as_i64()),
        ("legacy-3", Some(899))
    );
    assert_eq!(
        store
            .lookup(CatalogQuery::Barcode("2000000000015".into()))
            .expect("q")[0]
            .id,
        "legacy-4"
    );
    assert_eq!(
        count(&path, "catalog_id_map WHERE legacy_id = 4 AND sku IS NULL"),
        1
    );

    // sales: every legacy sale is in `sales`; the ones Drive never got are in the journal
    let n_sales = fixture.sales.len() as i64;
    let unsynced = fixture.unsynced_sales() as i64;
    assert_eq!(legacy.sales, n_sales);
    assert_eq!(count(&path, "sales WHERE source = 'legacy'"), n_sales);
    assert_eq!(
        count(&path, "sales WHERE local_event_id IS NULL"),
        n_sales - unsynced
    );
    assert_eq!(legacy.sales_history_only, n_sales - unsynced);
    assert_eq!(count(&path, "sync_journal"), unsynced);
    assert_eq!(
        legacy.sales_queued + legacy.sales_needing_attention,
        unsynced
    );
    assert_eq!(
        (legacy.sales_queued, legacy.sales_needing_attention),
        (3, 2)
    );
    // totals kept to the cent
    let legacy_sum: i64 = fixture.sales.iter().map(|s| s.total_cents).sum();
    let sum: i64 = raw(&path)
        .query_row("SELECT sum(total_minor) FROM sales", [], |r| r.get(0))
        .expect("sum");
    assert_eq!(sum, legacy_sum);
    // queued in legacy order with ids 1.., each journal row pointing at its sale
    let report_rows = store.journal_for_report().expect("report");
    assert_eq!(
        report_rows.iter().map(|r| r.1).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(
        count(&path, "sales s JOIN sync_journal j ON j.local_event_id = s.local_event_id WHERE s.legacy_sale_id IS NOT NULL"),
        unsynced
    );
    let attention = store
        .list_journal(Some(JournalStatus::NeedsAttention), 10)
        .expect("list");
    assert_eq!(attention.len(), 2);
    for row in &attention {
        assert_eq!(
            row.last_error_code.as_deref(),
            Some("POS_SYNC_EVENT_INVALID")
        );
        let msg = row.last_error_message.as_deref().unwrap_or_default();
        assert!(msg.starts_with("legacy sale #"), "{msg}");
    }
    // newest first: the later legacy row, then #7
    assert!(attention[1]
        .last_error_message
        .as_deref()
        .unwrap_or_default()
        .contains("#7"));
    assert!(attention[0]
        .last_error_message
        .as_deref()
        .unwrap_or_default()
        .contains("lines_json"));
    let refund: String = raw(&path)
        .query_row(
            "SELECT event_type FROM sync_journal WHERE local_event_id = 3",
            [],
            |r| r.get(0),
        )
        .expect("refund row");
    assert_eq!(refund, "refund");

    // new sales continue the sequence
    let e = store
        .enqueue_sale(EventType::Sale, Utc::now(), &payload("R-new", 1, 100))
        .expect("sale");
    assert_eq!(e.local_event_id, 6);

    // once enrolled, the converted sales go out as valid events of this terminal
    store.save_enrollment(&enrollment()).expect("enroll");
    let items = store.claim_batch(100, Utc::now()).expect("claim");
    assert_eq!(
        items
            .iter()
            .map(|i| i.event.local_event_id)
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 6]
    );
    for item in &items {
        validate_event(&item.event).expect("valid event");
        assert_eq!(item.event.pos_id, store.pos_id());
        assert_eq!(item.event.terminal_id, enrollment().terminal_id);
    }
    assert_eq!(items[0].event.payload.receipt_no, "L-000004");
    assert_eq!(items[0].event.payload.lines[1].sku, "SKU-SUGAR");
    assert_eq!(
        items[0].event.occurred_at.to_rfc3339(),
        "2026-10-03T12:30:00+00:00"
    );
}

#[test]
fn the_first_snapshot_maps_legacy_ids_to_cloud_ids_by_sku() {
    let (_dir, path) = temp_db();
    LegacyFixture::sample().write(&path).expect("write legacy");
    let store = SqliteStore::open(&path).expect("open");
    store
        .adjust_local_inventory("legacy-1", -2)
        .expect("sold two coffees offline");
    let stock_before = dump(&path, "local_inventory");
    let sales_before = dump(&path, "sales");
    store
        .apply_snapshot_page(
            &SnapshotPage {
                snapshot_version: 100,
                total: 3,
                entities: vec![
                    product("p-coffee", 90, "SKU-COFFEE", "4006381333931", "Coffee 250g"),
                    product("p-tea", 91, "SKU-TEA", "4006381333948", "Green Tea"),
                ],
                next_cursor: Some("c".into()),
            },
            true,
        )
        .expect("page 1");
    store
        .apply_snapshot_page(
            &SnapshotPage {
                snapshot_version: 100,
                total: 3,
                entities: vec![product("p-other", 92, "SKU-NEW", "1", "New")],
                next_cursor: None,
            },
            false,
        )
        .expect("page 2");
    let mapped: Vec<(i64, Option<String>)> = raw(&path)
        .prepare("SELECT legacy_id, cloud_entity_id FROM catalog_id_map ORDER BY legacy_id")
        .expect("prep")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("q")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(
        mapped,
        vec![
            (1, Some("p-coffee".into())),
            (2, Some("p-tea".into())),
            (3, None),
            (4, None),
            (7, None),
        ]
    );
    // cloud truth replaced the provisional legacy entities; the map and stock remain
    assert_eq!(
        count(&path, "catalog_entities WHERE entity_id LIKE 'legacy-%'"),
        0
    );
    assert_eq!(store.catalog_stats().expect("stats").entities, 3);
    assert_eq!(
        store.local_inventory("p-coffee").expect("stock"),
        Some(10),
        "read through the map"
    );
    assert_eq!(store.local_inventory("p-tea").expect("stock"), Some(0));
    assert_eq!(
        dump(&path, "local_inventory"),
        stock_before,
        "sync wrote no stock"
    );
    assert_eq!(dump(&path, "sales"), sales_before, "sync wrote no sales");
    assert_eq!(
        store.adjust_local_inventory("p-coffee", -1).expect("sell"),
        9
    );
    assert_eq!(store.local_inventory("legacy-1").expect("stock"), Some(9));
}

#[test]
fn migrate_legacy_reports_migrated_then_already_migrated() {
    let (_dir, path) = temp_db();
    LegacyFixture::sample().write(&path).expect("write legacy");
    // the old app numbered its own schema in the header; that must not block the migration
    raw(&path)
        .pragma_update(None, "user_version", 17)
        .expect("legacy user_version");
    let first = migrate_legacy(&path).expect("migrate");
    assert_eq!(first.outcome, LegacyOutcome::Migrated);
    assert!(first.backup_path.as_ref().is_some_and(|p| p.exists()));
    let again = migrate_legacy(&path).expect("again");
    assert_eq!(again.outcome, LegacyOutcome::AlreadyMigrated);
    assert_eq!(
        (again.products, again.sales, again.sales_queued),
        (first.products, first.sales, first.sales_queued)
    );
    assert_eq!(count(&path, "sync_journal"), 5, "nothing converted twice");
    assert_eq!(count(&path, "sales"), 8);

    let (_dir2, fresh) = temp_db();
    drop(open(&fresh));
    assert_eq!(
        migrate_legacy(&fresh).expect("fresh").outcome,
        LegacyOutcome::NoLegacyLayout
    );

    let missing = fresh.with_file_name("nope.db");
    assert!(matches!(
        migrate_legacy(&missing),
        Err(TerminalStoreError::NotADatabase(_))
    ));
    assert!(!missing.exists(), "no empty file created");
}

#[test]
fn a_larger_legacy_database_keeps_every_row() {
    let (_dir, path) = temp_db();
    let fixture = LegacyFixture::generated(2_000, 3_000);
    fixture.write(&path).expect("write");
    let report = migrate_legacy(&path).expect("migrate");
    let unsynced = fixture.unsynced_sales() as i64;
    assert_eq!(report.products, 2_000);
    assert_eq!(count(&path, "catalog_entities"), 2_000);
    assert_eq!(count(&path, "catalog_id_map"), 2_000);
    assert_eq!(count(&path, "local_inventory"), 2_000);
    assert_eq!(count(&path, "sales"), 3_000);
    assert_eq!(
        report.sales_queued, unsynced,
        "every generated sale is consistent"
    );
    assert_eq!(
        count(&path, "sync_journal WHERE status = 'pending'"),
        unsynced
    );
    assert_eq!(
        raw(&path)
            .query_row("SELECT max(local_event_id) FROM sync_journal", [], |r| r
                .get::<_, i64>(0))
            .expect("max"),
        unsynced
    );
}

#[test]
fn a_migration_interrupted_after_any_step_resumes_on_the_next_open() {
    use possync_terminal::store::{legacy, schema};
    let fixture = LegacyFixture::sample();
    // crash after step 1 (tables retired), and after step 2 (schema created, nothing converted)
    for stop_after_schema in [false, true] {
        let (_dir, path) = temp_db();
        fixture.write(&path).expect("write legacy");
        let original_sales = dump(&path, "sales");
        {
            let mut conn = raw(&path);
            legacy::retire_original_tables(&mut conn).expect("retire");
            if stop_after_schema {
                schema::apply_pending(&mut conn, schema::latest_version()).expect("schema");
            }
        }
        let (store, report) = SqliteStore::open_with_report(&path).expect("resume");
        let legacy = report.legacy.expect("conversion ran on resume");
        assert_eq!(legacy.products, fixture.products.len() as i64);
        assert_eq!(legacy.sales, fixture.sales.len() as i64);
        assert_eq!(dump(&path, "legacy_sales"), original_sales);
        assert_eq!(
            count(&path, "sync_journal"),
            fixture.unsynced_sales() as i64
        );
        assert_eq!(
            store.catalog_stats().expect("stats").entities,
            fixture.products.len() as i64
        );
        drop(store);
        // and a further open does nothing more
        let (_, again) = SqliteStore::open_with_report(&path).expect("reopen");
        assert_eq!(again.legacy, None);
        assert_eq!(count(&path, "sales"), fixture.sales.len() as i64);
    }
}
