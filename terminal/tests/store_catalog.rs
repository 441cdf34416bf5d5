//! The local catalog: snapshot (multi-page, resumable, completion cleanup), delta, reconcile,
//! version guards, tombstones, lookups — and that none of it touches sales or stock.

mod fixtures;

use chrono::Utc;
use fixtures::*;
use possync_actors::LocalStore;
use possync_protocol::{DeltaPage, EntityRef, EventType, KeyRange, ReconcilePlan, SnapshotPage};
use possync_terminal::store::{CatalogQuery, SqliteStore};
use std::path::Path;

fn snap(
    version: i64,
    total: i64,
    entities: Vec<possync_protocol::Entity>,
    next: Option<&str>,
) -> SnapshotPage {
    SnapshotPage {
        snapshot_version: version,
        total,
        entities,
        next_cursor: next.map(str::to_string),
    }
}

fn delta(changes: Vec<possync_protocol::Entity>, next_since: i64) -> DeltaPage {
    DeltaPage {
        changes,
        next_since,
        has_more: false,
        catalog_version: next_since,
    }
}

fn version_of(store: &SqliteStore, t: &str, id: &str) -> Option<i64> {
    store
        .manifest_after(None, 10_000)
        .expect("manifest")
        .into_iter()
        .find(|m| m.entity_type == t && m.id == id)
        .map(|m| m.version)
}

/// Sales and stock as they are, to compare after catalog work.
fn till_tables(path: &Path) -> (Vec<String>, Vec<String>) {
    (dump(path, "sales"), dump(path, "local_inventory"))
}

#[test]
fn a_multi_page_snapshot_resumes_from_its_cursor_and_cleans_up_on_completion() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    let pos = store.catalog_position().expect("pos");
    assert_eq!(pos.catalog_version, None);
    assert!(!pos.snapshot_in_progress);

    // local leftovers: one older than the snapshot and not listed (must go), one newer than
    // the snapshot and not listed (a later change: must stay)
    store
        .apply_delta_page(&delta(
            vec![
                entity("category", "old", 3),
                entity("category", "future", 60),
            ],
            60,
        ))
        .expect("seed");

    store
        .apply_snapshot_page(
            &snap(
                50,
                3,
                vec![
                    product("p1", 10, "S1", "111", "Coffee"),
                    product("p2", 20, "S2", "222", "Tea"),
                ],
                Some("c1"),
            ),
            true,
        )
        .expect("page 1");
    let pos = store.catalog_position().expect("pos");
    assert!(pos.snapshot_in_progress);
    assert_eq!(pos.snapshot_cursor.as_deref(), Some("c1"));
    assert_eq!(
        (
            pos.snapshot_version,
            pos.snapshot_total,
            pos.snapshot_received
        ),
        (Some(50), 3, 2)
    );

    // the daemon restarts: a new store on the same file resumes from the cursor
    drop(store);
    let store = open(&path);
    assert_eq!(
        store
            .catalog_position()
            .expect("pos")
            .snapshot_cursor
            .as_deref(),
        Some("c1")
    );
    store
        .apply_snapshot_page(
            &snap(50, 3, vec![entity("tax_rate", "std", 5)], None),
            false,
        )
        .expect("page 2");
    let pos = store.catalog_position().expect("pos");
    assert!(!pos.snapshot_in_progress);
    assert_eq!(pos.snapshot_cursor, None);
    assert_eq!(pos.catalog_version, Some(50));
    assert_eq!(pos.snapshot_received, 3);
    assert!(pos.last_synced_at.is_some());
    assert_eq!(
        version_of(&store, "category", "old"),
        None,
        "unlisted and not newer: removed"
    );
    assert_eq!(
        version_of(&store, "category", "future"),
        Some(60),
        "newer than the snapshot: kept"
    );
    assert_eq!(version_of(&store, "product", "p1"), Some(10));
    let stats = store.catalog_stats().expect("stats");
    assert_eq!((stats.version, stats.entities), (Some(50), 4));
}

#[test]
fn a_continuation_page_without_a_started_snapshot_is_refused() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    let err = store
        .apply_snapshot_page(&snap(5, 1, vec![entity("category", "a", 1)], None), false)
        .expect_err("no snapshot started");
    assert!(err.to_string().contains("never started"), "{err}");
    assert_eq!(store.catalog_stats().expect("stats").entities, 0);
}

#[test]
fn snapshot_never_puts_an_older_version_over_a_newer_one() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store
        .apply_delta_page(&delta(
            vec![product("p1", 70, "S1", "111", "Coffee v70")],
            70,
        ))
        .expect("seed");
    store
        .apply_snapshot_page(
            &snap(
                60,
                1,
                vec![product("p1", 40, "S1", "111", "Coffee v40")],
                None,
            ),
            true,
        )
        .expect("snapshot");
    let found = store
        .lookup(CatalogQuery::Sku("S1".into()))
        .expect("lookup");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].version, 70);
    assert_eq!(found[0].data["name"], "Coffee v70");
}

#[test]
fn deltas_upsert_newer_ignore_older_and_tombstones_delete() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store
        .apply_snapshot_page(
            &snap(
                10,
                3,
                vec![
                    product("p1", 5, "S1", "111", "A"),
                    product("p2", 6, "S2", "222", "B"),
                    product("p3", 7, "S3", "333", "C"),
                ],
                None,
            ),
            true,
        )
        .expect("snapshot");
    store
        .apply_delta_page(&delta(
            vec![
                product("p1", 11, "S1", "111", "A2"),   // newer: applied
                product("p2", 4, "S2", "222", "B-old"), // older: ignored
                tombstone("product", "p3", 12),         // deletes
                tombstone("product", "p2", 5),          // older than local v6: ignored
                product("p4", 13, "S4", "444", "D"),    // new
            ],
            13,
        ))
        .expect("delta");
    assert_eq!(version_of(&store, "product", "p1"), Some(11));
    assert_eq!(
        store.lookup(CatalogQuery::Sku("S1".into())).expect("q")[0].data["name"],
        "A2"
    );
    assert_eq!(version_of(&store, "product", "p2"), Some(6));
    assert_eq!(
        store.lookup(CatalogQuery::Sku("S2".into())).expect("q")[0].data["name"],
        "B"
    );
    assert_eq!(version_of(&store, "product", "p3"), None);
    assert_eq!(version_of(&store, "product", "p4"), Some(13));
    assert_eq!(
        store.catalog_position().expect("pos").catalog_version,
        Some(13)
    );
    // replaying the same page changes nothing
    let before = dump(&path, "catalog_entities");
    store
        .apply_delta_page(&delta(
            vec![
                product("p1", 11, "S1", "111", "A2"),
                tombstone("product", "p3", 12),
            ],
            13,
        ))
        .expect("replay");
    let strip = |rows: Vec<String>| {
        rows.into_iter()
            .map(|r| r.split('|').take(7).collect::<Vec<_>>().join("|"))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(dump(&path, "catalog_entities")), strip(before));
}

#[test]
fn require_resnapshot_forgets_the_position_but_keeps_the_catalog_usable() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store
        .apply_snapshot_page(
            &snap(10, 2, vec![product("p1", 5, "S1", "111", "A")], Some("c1")),
            true,
        )
        .expect("page");
    store.require_resnapshot().expect("resnapshot");
    let pos = store.catalog_position().expect("pos");
    assert_eq!(
        (
            pos.catalog_version,
            pos.snapshot_cursor,
            pos.snapshot_in_progress
        ),
        (None, None, false)
    );
    assert_eq!(
        store
            .lookup(CatalogQuery::Barcode("111".into()))
            .expect("q")
            .len(),
        1
    );
}

#[test]
fn the_manifest_is_in_bytewise_key_order_and_pages_after_a_key() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store
        .apply_delta_page(&delta(
            vec![
                entity("price_list", "a", 1),
                entity("price", "z", 1),
                entity("price", "a", 1),
                entity("category", "B", 1),
                entity("category", "a", 1),
                entity("product", "x/1", 1),
            ],
            1,
        ))
        .expect("seed");
    let keys: Vec<String> = store
        .manifest_after(None, 100)
        .expect("all")
        .into_iter()
        .map(|m| format!("{}/{}", m.entity_type, m.id))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!(keys, sorted);
    assert_eq!(keys[0], "category/B");
    let page = store.manifest_after(Some("price/z"), 1).expect("page");
    assert_eq!(
        (page[0].entity_type.as_str(), page[0].id.as_str()),
        ("price_list", "a")
    );
    let page = store.manifest_after(Some("category/a"), 2).expect("page");
    assert_eq!(
        page.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        vec!["a", "z"]
    );
    assert!(store
        .manifest_after(Some("product/x/1"), 10)
        .expect("end")
        .is_empty());
}

#[test]
fn reconcile_repairs_tampering_but_never_undoes_a_newer_delta() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store
        .apply_snapshot_page(
            &snap(
                20,
                4,
                vec![
                    product("p1", 10, "S1", "111", "A"),
                    product("p2", 11, "S2", "222", "B"),
                    product("p3", 12, "S3", "333", "C"),
                    product("p4", 13, "S4", "444", "D"),
                ],
                None,
            ),
            true,
        )
        .expect("snapshot");
    // tampering: p1's data edited in place, p2's version forged beyond anything the cloud issued
    let conn = raw(&path);
    conn.execute("UPDATE catalog_entities SET data = json_set(data, '$.name', 'HACKED') WHERE entity_id = 'p1'", [])
        .expect("tamper data");
    conn.execute("UPDATE catalog_entities SET version = 999, data = json_set(data, '$.name', 'FORGED') WHERE entity_id = 'p2'", [])
        .expect("tamper version");
    // p3's version forged upwards but still within the plan's version: indistinguishable from
    // the cloud's own numbering, so only the plan's version can tell it is not the cloud's row
    conn.execute("UPDATE catalog_entities SET version = 13, data = json_set(data, '$.name', 'BUMPED') WHERE entity_id = 'p3'", [])
        .expect("tamper version below the plan's");
    conn.execute("INSERT INTO catalog_entities (entity_type, entity_id, version, hash, data, updated_at) VALUES ('product', 'rogue', 1, 'h', '{}', 't')", [])
        .expect("rogue row");
    conn.execute("INSERT INTO catalog_entities (entity_type, entity_id, version, hash, data, updated_at) VALUES ('product', 'forged', 999, 'h', '{}', 't')", [])
        .expect("rogue row with a version the cloud never issued");
    // a legitimate delta made p4 newer than what the (older) plan carries
    store
        .apply_delta_page(&delta(vec![product("p4", 21, "S4", "444", "D21")], 21))
        .expect("delta");
    let (sales, stock) = till_tables(&path);

    store
        .apply_reconcile_plan(
            &KeyRange::default(),
            &ReconcilePlan {
                upserts: vec![
                    product("p1", 10, "S1", "111", "A"),
                    product("p2", 11, "S2", "222", "B"),
                    product("p3", 12, "S3", "333", "C"),
                    product("p4", 13, "S4", "444", "D"),
                ],
                deletes: vec![
                    EntityRef {
                        entity_type: "product".into(),
                        id: "rogue".into(),
                    },
                    EntityRef {
                        entity_type: "product".into(),
                        id: "forged".into(),
                    },
                    // the plan predates the delta that brought p4 at 21: keep p4
                    EntityRef {
                        entity_type: "product".into(),
                        id: "p4".into(),
                    },
                ],
            },
            13,
        )
        .expect("apply");
    assert_eq!(
        store.lookup(CatalogQuery::Sku("S1".into())).expect("q")[0].data["name"],
        "A"
    );
    let p2 = &store.lookup(CatalogQuery::Sku("S2".into())).expect("q")[0];
    assert_eq!((p2.version, p2.data["name"].as_str()), (11, Some("B")));
    let p3 = &store.lookup(CatalogQuery::Sku("S3".into())).expect("q")[0];
    assert_eq!((p3.version, p3.data["name"].as_str()), (12, Some("C")));
    assert_eq!(
        store.lookup(CatalogQuery::Sku("S4".into())).expect("q")[0].version,
        21,
        "newer delta kept"
    );
    assert_eq!(version_of(&store, "product", "rogue"), None);
    assert_eq!(version_of(&store, "product", "forged"), None);
    assert_eq!(till_tables(&path), (sales, stock));
}

#[test]
fn lookups_find_products_by_barcode_sku_and_name_offline() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store
        .apply_snapshot_page(
            &snap(
                5,
                5,
                vec![
                    product("p1", 1, "SKU-1", "4006381333931", "Espresso Beans"),
                    product("p2", 1, "SKU-2", "4006381333948", "Green Tea"),
                    product("p3", 1, "SKU-3", "4006381333955", "Iced Tea 100%"),
                    product("p4", 1, "SKU-4", "4006381333962", "Tea Cake"),
                    entity("category", "tea", 1),
                ],
                None,
            ),
            true,
        )
        .expect("snapshot");
    let ids = |q| -> Vec<String> {
        store
            .lookup(q)
            .expect("lookup")
            .into_iter()
            .map(|e| e.id)
            .collect()
    };
    assert_eq!(
        ids(CatalogQuery::Barcode("4006381333948".into())),
        vec!["p2"]
    );
    assert_eq!(ids(CatalogQuery::Sku("SKU-3".into())), vec!["p3"]);
    assert!(ids(CatalogQuery::Sku("SKU-9".into())).is_empty());
    // prefix matches first, then substring matches; case-insensitive
    assert_eq!(
        ids(CatalogQuery::Text("tea".into())),
        vec!["p4", "p2", "p3"]
    );
    assert_eq!(ids(CatalogQuery::Text("ESPRESSO".into())), vec!["p1"]);
    assert_eq!(ids(CatalogQuery::Text("100%".into())), vec!["p3"]);
    assert_eq!(
        ids(CatalogQuery::Text("%".into())),
        vec!["p3"],
        "wildcards are literal"
    );
    assert!(
        ids(CatalogQuery::Text("_".into())).is_empty(),
        "wildcards are literal"
    );
    assert!(ids(CatalogQuery::Text("  ".into())).is_empty());
    let found = store
        .lookup(CatalogQuery::Barcode("4006381333931".into()))
        .expect("q");
    assert_eq!(found[0].data["name"], "Espresso Beans");
    assert_eq!(
        found[0].hash,
        product("p1", 1, "SKU-1", "4006381333931", "Espresso Beans").hash
    );
}

#[test]
fn catalog_sync_never_touches_sales_or_local_inventory() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store.save_enrollment(&enrollment()).expect("enroll");
    store
        .enqueue_sale(EventType::Sale, Utc::now(), &payload("R-1", 2, 250))
        .expect("sale");
    store.adjust_local_inventory("p1", 7).expect("stock");
    let before = till_tables(&path);
    store
        .apply_snapshot_page(
            &snap(5, 2, vec![product("p1", 1, "S1", "1", "A")], Some("c")),
            true,
        )
        .expect("p1");
    store
        .apply_snapshot_page(
            &snap(5, 2, vec![product("p2", 2, "S2", "2", "B")], None),
            false,
        )
        .expect("p2");
    store
        .apply_delta_page(&delta(
            vec![
                product("p1", 6, "S1", "1", "A6"),
                tombstone("product", "p2", 7),
            ],
            7,
        ))
        .expect("delta");
    store.require_resnapshot().expect("resnapshot");
    store
        .apply_reconcile_plan(
            &KeyRange::default(),
            &ReconcilePlan {
                upserts: vec![product("p3", 3, "S3", "3", "C")],
                deletes: vec![EntityRef {
                    entity_type: "product".into(),
                    id: "p1".into(),
                }],
            },
            7,
        )
        .expect("reconcile");
    assert_eq!(till_tables(&path), before);
    assert_eq!(store.local_inventory("p1").expect("stock"), Some(7));
}

#[test]
fn a_stale_upsert_after_a_tombstone_does_not_resurrect_the_entity() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store
        .apply_delta_page(&delta(vec![product("p1", 5, "S1", "111", "A")], 5))
        .expect("create");
    store
        .apply_delta_page(&delta(vec![tombstone("product", "p1", 9)], 9))
        .expect("delete");
    // an older version arriving late (replayed page, stale reconcile plan) stays dead
    store
        .apply_delta_page(&delta(vec![product("p1", 7, "S1", "111", "A7")], 9))
        .expect("stale");
    store
        .apply_reconcile_plan(
            &KeyRange::default(),
            &ReconcilePlan {
                upserts: vec![product("p1", 8, "S1", "111", "A8")],
                deletes: vec![],
            },
            8,
        )
        .expect("stale plan");
    assert_eq!(version_of(&store, "product", "p1"), None);
    assert!(store
        .lookup(CatalogQuery::Sku("S1".into()))
        .expect("q")
        .is_empty());
    assert_eq!(store.catalog_stats().expect("stats").entities, 0);
    // a newer version brings it back
    store
        .apply_delta_page(&delta(vec![product("p1", 10, "S1", "111", "A10")], 10))
        .expect("recreate");
    assert_eq!(version_of(&store, "product", "p1"), Some(10));
    assert_eq!(
        store.lookup(CatalogQuery::Sku("S1".into())).expect("q")[0].data["name"],
        "A10"
    );
    // and a snapshot purges tombstones it supersedes
    store
        .apply_delta_page(&delta(vec![tombstone("product", "p1", 11)], 11))
        .expect("delete again");
    assert_eq!(count(&path, "catalog_entities WHERE deleted = 1"), 1);
    store
        .apply_snapshot_page(&snap(12, 0, vec![], None), true)
        .expect("empty snapshot");
    assert_eq!(count(&path, "catalog_entities"), 0);
}

/// Small deterministic generator (xorshift64*), so the property below needs no extra crate and
/// every failure reproduces from its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn whatever_order_changes_arrive_in_the_newest_version_of_each_key_wins() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        // every change has its own version, as the cloud's counter guarantees
        let mut changes = Vec::new();
        for version in 1..=30i64 {
            let key = format!("s{seed}-k{}", rng.below(5));
            if rng.below(4) == 0 {
                changes.push(tombstone("product", &key, version));
            } else {
                changes.push(product(
                    &key,
                    version,
                    &format!("{key}-v{version}"),
                    "",
                    "n",
                ));
            }
        }
        // expected: per key, the change with the highest version
        let mut expected: std::collections::BTreeMap<String, (i64, bool)> = Default::default();
        for c in &changes {
            let e = expected
                .entry(c.id.clone())
                .or_insert((c.version, c.deleted));
            if c.version >= e.0 {
                *e = (c.version, c.deleted);
            }
        }
        // deliver shuffled, with some duplicated (replays), in random page sizes
        let mut delivery = changes.clone();
        for _ in 0..10 {
            let i = rng.below(changes.len() as u64) as usize;
            delivery.push(changes[i].clone());
        }
        for i in (1..delivery.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            delivery.swap(i, j);
        }
        let mut rest = delivery.as_slice();
        while !rest.is_empty() {
            let n = (1 + rng.below(6) as usize).min(rest.len());
            let (page, tail) = rest.split_at(n);
            store
                .apply_delta_page(&delta(page.to_vec(), 30))
                .expect("page");
            rest = tail;
        }
        for (key, (version, deleted)) in expected {
            let got = version_of(&store, "product", &key);
            if deleted {
                assert_eq!(
                    got, None,
                    "seed {seed}: {key} must be deleted at v{version}"
                );
            } else {
                assert_eq!(got, Some(version), "seed {seed}: {key}");
                let found = store
                    .lookup(CatalogQuery::Sku(format!("{key}-v{version}")))
                    .expect("lookup");
                assert_eq!(found.len(), 1, "seed {seed}: data of v{version} for {key}");
            }
        }
    }
}
