//! Catalog tests, each run against PostgreSQL and SQLite.

use super::*;
use crate::db::test_support::{each_backend, postgres};
use crate::db::Database;
use possync_protocol::{KeyRange, ManifestEntry};
use serde_json::json;

fn write(t: &str, id: &str, branch: Option<&str>, data: serde_json::Value) -> EntityWrite {
    EntityWrite {
        entity_type: t.into(),
        id: id.into(),
        branch_id: branch.map(str::to_string),
        data,
    }
}

fn key(t: &str, id: &str) -> (String, String) {
    (t.to_string(), id.to_string())
}

fn conn(db: &Database) -> crate::db::PooledConn {
    db.conn().expect("conn")
}

#[test]
fn upsert_numbers_changes_and_skips_no_ops() {
    each_backend(|db| {
        let mut c = conn(db);
        assert_eq!(current_version(&mut c).expect("version"), 0);
        let out = upsert_entities(
            &mut c,
            &[
                write("product", "p1", None, json!({"name": "Tea", "price": 250})),
                write("price", "p1", Some("b1"), json!({"amount_minor": 240})),
            ],
        )
        .expect("upsert");
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].version, out[1].version), (1, 2));
        assert_eq!(
            out[0].hash,
            entity_hash(&json!({"price": 250, "name": "Tea"}))
        );
        assert_eq!(out[1].branch_id.as_deref(), Some("b1"));
        assert!(!out[0].deleted);
        assert_eq!(current_version(&mut c).expect("version"), 2);

        // Same data again (any key order): no new version.
        let again = upsert_entities(
            &mut c,
            &[write(
                "product",
                "p1",
                None,
                json!({"price": 250, "name": "Tea"}),
            )],
        )
        .expect("upsert");
        assert_eq!(again[0].version, 1);
        assert_eq!(current_version(&mut c).expect("version"), 2);

        // Changed data: next version.
        let changed = upsert_entities(
            &mut c,
            &[write(
                "product",
                "p1",
                None,
                json!({"name": "Tea", "price": 260}),
            )],
        )
        .expect("upsert");
        assert_eq!(changed[0].version, 3);
        assert_eq!(changed[0].data, json!({"name": "Tea", "price": 260}));
    });
}

#[test]
fn a_key_written_twice_in_one_call_ends_in_its_last_state() {
    each_backend(|db| {
        let mut c = conn(db);
        let out = upsert_entities(
            &mut c,
            &[
                write("product", "p1", None, json!({"v": 1})),
                write("product", "p2", None, json!({"v": 1})),
                write("product", "p1", None, json!({"v": 2})),
            ],
        )
        .expect("upsert");
        let versions: Vec<i64> = out.iter().map(|e| e.version).collect();
        assert_eq!(versions, vec![1, 2, 3]);
        let page = delta_page(&mut c, "b1", 0, 10).expect("delta");
        let seen: Vec<(String, i64, serde_json::Value)> = page
            .changes
            .into_iter()
            .map(|e| (e.id, e.version, e.data))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("p2".to_string(), 2, json!({"v": 1})),
                ("p1".to_string(), 3, json!({"v": 2})),
            ]
        );
    });
}

#[test]
fn invalid_writes_and_scope_changes_are_refused_without_effect() {
    each_backend(|db| {
        let mut c = conn(db);
        for bad in [
            write("Product", "p1", None, json!({})),
            write("product", "has space", None, json!({})),
            write("product", "p1", Some("B1"), json!({})),
            write("product", "p1", None, serde_json::Value::Null),
        ] {
            assert!(
                matches!(
                    upsert_entities(&mut c, std::slice::from_ref(&bad)),
                    Err(CatalogError::InvalidEntity(_))
                ),
                "{bad:?} must be refused"
            );
        }
        upsert_entities(&mut c, &[write("product", "p1", None, json!({"a": 1}))]).expect("upsert");
        let err = upsert_entities(
            &mut c,
            &[
                write("product", "p2", None, json!({"a": 2})),
                write("product", "p1", Some("b1"), json!({"a": 1})),
            ],
        );
        assert!(matches!(err, Err(CatalogError::InvalidEntity(_))));
        // The whole transaction rolled back: p2 was not written, no version was used.
        assert_eq!(current_version(&mut c).expect("version"), 1);
        let page = snapshot_page(&mut c, "b1", None, 10).expect("snapshot");
        assert_eq!(page.total, 1);
    });
}

#[test]
fn delete_writes_tombstones_and_ignores_unknown_keys() {
    each_backend(|db| {
        let mut c = conn(db);
        upsert_entities(
            &mut c,
            &[
                write("product", "p1", None, json!({"a": 1})),
                write("product", "p2", None, json!({"a": 2})),
            ],
        )
        .expect("upsert");
        let gone = delete_entities(
            &mut c,
            &[
                key("product", "p1"),
                key("product", "nope"),
                key("product", "p1"),
            ],
        )
        .expect("delete");
        assert_eq!(gone.len(), 1);
        assert!(gone[0].deleted);
        assert_eq!(gone[0].version, 3);
        assert_eq!(gone[0].data, serde_json::Value::Null);
        assert_eq!(gone[0].hash, entity_hash(&serde_json::Value::Null));
        // Deleting again is a no-op.
        assert!(delete_entities(&mut c, &[key("product", "p1")])
            .expect("delete")
            .is_empty());
        assert_eq!(current_version(&mut c).expect("version"), 3);
        // Re-creating a deleted key gives it a new version and makes it live again.
        let back = upsert_entities(&mut c, &[write("product", "p1", None, json!({"a": 1}))])
            .expect("upsert");
        assert_eq!(back[0].version, 4);
        assert!(!back[0].deleted);
    });
}

/// 7 global, 5 of b1, 4 of b2 entities; one global and one b1 entity deleted.
fn seed_two_branches(c: &mut DbConn) {
    let mut writes = Vec::new();
    for i in 0..7 {
        writes.push(write("product", &format!("g{i}"), None, json!({"i": i})));
    }
    for i in 0..5 {
        writes.push(write(
            "price",
            &format!("b1-{i}"),
            Some("b1"),
            json!({"i": i}),
        ));
    }
    for i in 0..4 {
        writes.push(write(
            "price",
            &format!("b2-{i}"),
            Some("b2"),
            json!({"i": i}),
        ));
    }
    upsert_entities(c, &writes).expect("seed");
    delete_entities(c, &[key("product", "g3"), key("price", "b1-0")]).expect("delete");
}

#[test]
fn snapshot_pages_cover_the_branch_view_exactly_once() {
    each_backend(|db| {
        let mut c = conn(db);
        seed_two_branches(&mut c);
        let mut cursor: Option<String> = None;
        let mut seen: Vec<String> = Vec::new();
        let mut pages = 0;
        let mut first_version = None;
        loop {
            let page = snapshot_page(&mut c, "b1", cursor.as_deref(), 3).expect("page");
            pages += 1;
            assert_eq!(page.total, 10, "6 live global + 4 live b1");
            assert_eq!(
                *first_version.get_or_insert(page.snapshot_version),
                page.snapshot_version
            );
            for e in &page.entities {
                assert!(!e.deleted);
                assert!(e.branch_id.is_none() || e.branch_id.as_deref() == Some("b1"));
                seen.push(e.key().to_string());
            }
            cursor = page.next_cursor;
            if cursor.is_none() {
                break;
            }
        }
        assert_eq!(pages, 4);
        assert_eq!(seen.len(), 10);
        let mut sorted = seen.clone();
        sorted.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        assert_eq!(seen, sorted, "pages are in bytewise key order");
        assert!(seen.iter().all(|k| !k.contains("b2-")));
        assert!(!seen.contains(&"product/g3".to_string()));
        assert_eq!(first_version, Some(18));
    });
}

#[test]
fn snapshot_resumes_from_a_stored_cursor_and_sees_later_changes() {
    each_backend(|db| {
        let mut c = conn(db);
        seed_two_branches(&mut c);
        let first = snapshot_page(&mut c, "b1", None, 4).expect("page");
        let cursor = first.next_cursor.clone().expect("more pages");
        // A change after the snapshot started: appears in its new state in a later page.
        upsert_entities(&mut c, &[write("product", "g6", None, json!({"i": 60}))]).expect("upsert");
        let mut c2 = conn(db); // "restarted terminal": another connection, same cursor
        let rest = snapshot_page(&mut c2, "b1", Some(&cursor), 100).expect("resume");
        assert_eq!(rest.snapshot_version, first.snapshot_version);
        assert_eq!(rest.total, first.total);
        assert!(rest.next_cursor.is_none());
        assert_eq!(first.entities.len() + rest.entities.len(), 10);
        let g6 = rest
            .entities
            .iter()
            .find(|e| e.id == "g6")
            .expect("g6 in the second page");
        assert_eq!(g6.data, json!({"i": 60}));
        assert!(g6.version > rest.snapshot_version);
    });
}

#[test]
fn bad_snapshot_cursors_are_refused() {
    each_backend(|db| {
        let mut c = conn(db);
        seed_two_branches(&mut c);
        for bad in ["", "!!!", "bm90IGpzb24", "eyJ2IjoxfQ"] {
            assert!(
                matches!(
                    snapshot_page(&mut c, "b1", Some(bad), 10),
                    Err(CatalogError::BadCursor(_))
                ),
                "{bad:?}"
            );
        }
        let ahead = SnapshotCursor {
            v: 10_000,
            t: 1,
            after: key("product", "a"),
        }
        .encode()
        .expect("encode");
        assert!(matches!(
            snapshot_page(&mut c, "b1", Some(&ahead), 10),
            Err(CatalogError::BadCursor(_))
        ));
    });
}

#[test]
fn delta_is_version_ordered_branch_filtered_and_carries_tombstones() {
    each_backend(|db| {
        let mut c = conn(db);
        seed_two_branches(&mut c);
        let mut since = 0;
        let mut versions = Vec::new();
        let mut tombstones = Vec::new();
        loop {
            let page = delta_page(&mut c, "b1", since, 4).expect("delta");
            assert_eq!(page.catalog_version, 18);
            for e in &page.changes {
                assert!(e.branch_id.is_none() || e.branch_id.as_deref() == Some("b1"));
                versions.push(e.version);
                if e.deleted {
                    tombstones.push(e.key().to_string());
                }
            }
            assert!(page.next_since >= since);
            since = page.next_since;
            if !page.has_more {
                break;
            }
        }
        let mut sorted = versions.clone();
        sorted.sort_unstable();
        assert_eq!(versions, sorted);
        // 7 global + 5 b1 rows, each once (the two deleted ones as tombstones).
        assert_eq!(versions.len(), 12);
        tombstones.sort();
        assert_eq!(tombstones, vec!["price/b1-0", "product/g3"]);
        assert_eq!(since, 18);

        // b2 sees its own rows, never b1's.
        let b2 = delta_page(&mut c, "b2", 0, 1000).expect("delta");
        assert!(b2
            .changes
            .iter()
            .all(|e| e.branch_id.as_deref() != Some("b1")));
        assert_eq!(b2.changes.len(), 7 + 4);
    });
}

#[test]
fn delta_cursor_moves_past_other_branches_changes() {
    each_backend(|db| {
        let mut c = conn(db);
        seed_two_branches(&mut c);
        let caught_up = delta_page(&mut c, "b1", 0, 1000).expect("delta");
        upsert_entities(&mut c, &[write("price", "b2-9", Some("b2"), json!({}))]).expect("b2");
        let page = delta_page(&mut c, "b1", caught_up.next_since, 10).expect("delta");
        assert!(page.changes.is_empty());
        assert!(!page.has_more);
        assert_eq!(page.next_since, 19);
        assert_eq!(page.catalog_version, 19);
    });
}

#[test]
fn bad_since_is_refused() {
    each_backend(|db| {
        let mut c = conn(db);
        seed_two_branches(&mut c);
        assert!(matches!(
            delta_page(&mut c, "b1", -1, 10),
            Err(CatalogError::BadSince(_))
        ));
        assert!(matches!(
            delta_page(&mut c, "b1", 19, 10),
            Err(CatalogError::BadSince(_))
        ));
        assert!(delta_page(&mut c, "b1", 18, 10)
            .expect("at head")
            .changes
            .is_empty());
    });
}

#[test]
fn purge_raises_the_horizon_and_old_cursors_must_resnapshot() {
    each_backend(|db| {
        let mut c = conn(db);
        seed_two_branches(&mut c); // tombstones at versions 17 and 18
                                   // Nothing is old enough yet.
        assert_eq!(
            purge_tombstones(&mut c, chrono::Duration::hours(1)).expect("purge"),
            0
        );
        assert_eq!(horizon(&mut c).expect("horizon"), 0);
        let old_snapshot = snapshot_page(&mut c, "b1", None, 2).expect("page");
        assert_eq!(old_snapshot.snapshot_version, 18);
        delete_entities(&mut c, &[key("product", "g4")]).expect("delete"); // version 19
        upsert_entities(&mut c, &[write("product", "late", None, json!({}))]).expect("upsert"); // 20
                                                                                                // Everything deleted before now.
        assert_eq!(
            purge_tombstones(&mut c, chrono::Duration::zero()).expect("purge"),
            3
        );
        assert_eq!(horizon(&mut c).expect("horizon"), 19);
        assert!(matches!(
            delta_page(&mut c, "b1", 18, 10),
            Err(CatalogError::ResnapshotRequired { horizon: 19 })
        ));
        let at = delta_page(&mut c, "b1", 19, 10).expect("at the horizon is fine");
        assert_eq!(at.changes.len(), 1);
        assert_eq!(at.changes[0].id, "late");
        // The snapshot taken before the g4 delete could not learn it any more: refused.
        assert!(matches!(
            snapshot_page(&mut c, "b1", old_snapshot.next_cursor.as_deref(), 2),
            Err(CatalogError::BadCursor(_))
        ));
        // A new snapshot no longer lists the purged keys, and deltas from it work.
        let fresh = snapshot_page(&mut c, "b1", None, 100).expect("snapshot");
        assert_eq!(fresh.snapshot_version, 20);
        assert_eq!(fresh.total, 10);
        assert!(fresh.entities.iter().all(|e| e.id != "g4" && e.id != "g3"));
        delta_page(&mut c, "b1", fresh.snapshot_version, 10).expect("delta");
    });
}

fn manifest_entry(e: &Entity) -> ManifestEntry {
    ManifestEntry {
        entity_type: e.entity_type.clone(),
        id: e.id.clone(),
        version: e.version,
        hash: e.hash.clone(),
    }
}

#[test]
fn reconcile_plans_exactly_the_repair() {
    each_backend(|db| {
        let mut c = conn(db);
        seed_two_branches(&mut c);
        let truth = snapshot_page(&mut c, "b1", None, 1000)
            .expect("snapshot")
            .entities;
        // The terminal's copy: one missing, one stale, one deleted upstream, one of b2.
        let mut entries: Vec<ManifestEntry> = truth
            .iter()
            .filter(|e| e.id != "g0")
            .map(manifest_entry)
            .collect();
        let stale = entries.iter_mut().find(|e| e.id == "g1").expect("g1");
        stale.hash = "0".repeat(64);
        entries.push(ManifestEntry {
            entity_type: "product".into(),
            id: "g3".into(),
            version: 3,
            hash: "x".into(),
        });
        entries.push(ManifestEntry {
            entity_type: "price".into(),
            id: "b2-1".into(),
            version: 3,
            hash: "x".into(),
        });
        let req = ReconcileRequest {
            mode: ReconcileMode::Plan,
            range: KeyRange::default(),
            entries,
        };
        let resp = reconcile(&mut c, "b1", &req, 2000).expect("reconcile");
        assert_eq!(resp.catalog_version, 18);
        let up: Vec<String> = resp
            .plan
            .upserts
            .iter()
            .map(|e| e.key().to_string())
            .collect();
        assert_eq!(up, vec!["product/g0", "product/g1"]);
        assert_eq!(resp.plan.upserts[0].data, json!({"i": 0}));
        let del: Vec<String> = resp
            .plan
            .deletes
            .iter()
            .map(|d| format!("{}/{}", d.entity_type, d.id))
            .collect();
        assert_eq!(del, vec!["price/b2-1", "product/g3"]);
        assert_eq!(
            resp.summary,
            ReconcileSummary {
                checked: 12,
                unchanged: 8,
                upserts: 2,
                deletes: 2
            }
        );

        // Verify: same summary, empty plan.
        let verify = reconcile(
            &mut c,
            "b1",
            &ReconcileRequest {
                mode: ReconcileMode::Verify,
                ..req.clone()
            },
            2000,
        )
        .expect("verify");
        assert_eq!(verify.summary, resp.summary);
        assert_eq!(verify.plan, ReconcilePlan::default());

        // Applying the plan makes the manifest match: nothing left to do.
        let repaired: Vec<ManifestEntry> = truth.iter().map(manifest_entry).collect();
        let clean = reconcile(
            &mut c,
            "b1",
            &ReconcileRequest {
                mode: ReconcileMode::Plan,
                range: KeyRange::default(),
                entries: repaired,
            },
            2000,
        )
        .expect("reconcile");
        assert_eq!(clean.summary.unchanged, 10);
        assert_eq!(clean.summary.upserts + clean.summary.deletes, 0);
    });
}

#[test]
fn reconcile_respects_the_range_and_rejects_bad_manifests() {
    each_backend(|db| {
        let mut c = conn(db);
        seed_two_branches(&mut c);
        let range = KeyRange {
            after: Some("price/b1-2".into()),
            through: Some("product/g1".into()),
        };
        let resp = reconcile(
            &mut c,
            "b1",
            &ReconcileRequest {
                mode: ReconcileMode::Plan,
                range: range.clone(),
                entries: vec![],
            },
            2000,
        )
        .expect("reconcile");
        let up: Vec<String> = resp
            .plan
            .upserts
            .iter()
            .map(|e| e.key().to_string())
            .collect();
        assert_eq!(
            up,
            vec!["price/b1-3", "price/b1-4", "product/g0", "product/g1"]
        );
        assert_eq!(resp.range, range);

        let entry = |t: &str, id: &str| ManifestEntry {
            entity_type: t.into(),
            id: id.into(),
            version: 1,
            hash: "h".into(),
        };
        let bad = |entries: Vec<ManifestEntry>, range: KeyRange| ReconcileRequest {
            mode: ReconcileMode::Verify,
            range,
            entries,
        };
        for req in [
            bad(vec![entry("price", "b1-2")], range.clone()), // `after` itself is outside
            bad(vec![entry("product", "g2")], range.clone()),
            bad(
                vec![entry("product", "g1"), entry("product", "g1")],
                range.clone(),
            ),
            bad(vec![entry("Product", "g1")], KeyRange::default()),
            bad(
                vec![],
                KeyRange {
                    after: Some("no-slash".into()),
                    through: None,
                },
            ),
        ] {
            assert!(
                matches!(
                    reconcile(&mut c, "b1", &req, 2000),
                    Err(CatalogError::BadManifest(_))
                ),
                "{req:?}"
            );
        }
        let many = bad(
            (0..3).map(|i| entry("product", &format!("g{i}"))).collect(),
            KeyRange::default(),
        );
        assert!(matches!(
            reconcile(&mut c, "b1", &many, 2),
            Err(CatalogError::ManifestTooLarge { max_entries: 2 })
        ));
        assert!(reconcile(&mut c, "b1", &many, 3).is_ok());
    });
}

fn product(id: String, n: usize) -> EntityWrite {
    EntityWrite {
        entity_type: "product".into(),
        id,
        branch_id: None,
        data: json!({ "n": n }),
    }
}

#[test]
fn import_commits_in_batches_and_a_reimport_changes_nothing() {
    each_backend(|db| {
        let mut c = conn(db);
        let mut writes: Vec<EntityWrite> = (0..IMPORT_BATCH + 5)
            .map(|i| product(format!("p{i}"), i))
            .collect();
        writes.push(EntityWrite {
            entity_type: "price".into(),
            id: "x".into(),
            branch_id: Some("b1".into()),
            data: json!({}),
        });
        let all = IMPORT_BATCH + 6;
        assert_eq!(import_entities(&mut c, &writes).expect("import"), all);
        assert_eq!(current_version(&mut c).expect("version"), all as i64);
        // Re-import: every entity is still stored, none changes.
        assert_eq!(import_entities(&mut c, &writes).expect("re-import"), all);
        assert_eq!(current_version(&mut c).expect("version"), all as i64);

        // A bad entity in the second batch: the first batch stays committed.
        let mut more: Vec<EntityWrite> = (0..IMPORT_BATCH)
            .map(|i| product(format!("q{i}"), i))
            .collect();
        more.push(EntityWrite {
            entity_type: "Not A Type".into(),
            ..product("bad".into(), 0)
        });
        assert!(import_entities(&mut c, &more).is_err());
        assert_eq!(
            current_version(&mut c).expect("version"),
            (all + IMPORT_BATCH) as i64
        );
    });
}

/// Four writers commit 50 single-entity upserts each while a reader pulls deltas from 0 in a
/// loop. Because versions become visible in numeric order, the reader must end having seen
/// every version 1..=200 exactly once, in order, with no gaps.
#[test]
fn concurrent_writers_never_make_a_delta_reader_skip_a_version() {
    let t = postgres();
    let db = t.db.clone();
    const WRITERS: usize = 4;
    const EACH: usize = 50;
    let total = (WRITERS * EACH) as i64;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let db = db.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut c = db.conn().expect("conn");
                for i in 0..EACH {
                    upsert_entities(
                        &mut c,
                        &[write(
                            "product",
                            &format!("w{w}-{i}"),
                            None,
                            json!({"w": w, "i": i}),
                        )],
                    )
                    .expect("upsert");
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        })
        .collect();
    let mut c = db.conn().expect("conn");
    let mut since = 0;
    let mut seen: Vec<i64> = Vec::new();
    loop {
        let finished = done.load(std::sync::atomic::Ordering::SeqCst) == WRITERS;
        let page = delta_page(&mut c, "b1", since, 7).expect("delta");
        seen.extend(page.changes.iter().map(|e| e.version));
        since = page.next_since;
        if finished && !page.has_more && since == total {
            break;
        }
    }
    for w in writers {
        w.join().expect("writer");
    }
    let expected: Vec<i64> = (1..=total).collect();
    assert_eq!(seen, expected);
}

/// A branch terminal's catalog copy, applying what the cloud sends the way a terminal must:
/// guarded by version, keeping tombstones so an older upsert cannot resurrect a delete.
#[derive(Default)]
struct Replica {
    rows: HashMap<EntityKey, (i64, Option<serde_json::Value>)>,
}

impl Replica {
    fn apply(&mut self, e: &Entity) {
        let key = e.key();
        if self.rows.get(&key).is_some_and(|(v, _)| *v >= e.version) {
            return;
        }
        let data = (!e.deleted).then(|| e.data.clone());
        self.rows.insert(key, (e.version, data));
    }

    fn live(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        self.rows
            .iter()
            .filter_map(|(k, (_, d))| d.as_ref().map(|d| (k.to_string(), d.clone())))
            .collect()
    }
}

/// The writer side of the model: every key's scope and its current data (None = deleted).
struct Model {
    keys: Vec<(String, String, Option<String>)>,
    state: HashMap<(String, String), Option<serde_json::Value>>,
}

impl Model {
    fn new() -> Model {
        let mut keys = Vec::new();
        for i in 0..30 {
            let (t, scope) = match i % 3 {
                0 => ("product", None),
                1 => ("price", Some("b1".to_string())),
                _ => ("price", Some("b2".to_string())),
            };
            keys.push((t.to_string(), format!("k{i:02}"), scope));
        }
        Model {
            keys,
            state: HashMap::new(),
        }
    }

    /// One random upsert or delete, applied to the database and to the model.
    fn step(&mut self, c: &mut DbConn, rng: &mut impl rand::Rng, n: usize) {
        let (t, id, scope) = self.keys[rng.random_range(0..self.keys.len())].clone();
        if rng.random_bool(0.25) {
            delete_entities(c, &[(t.clone(), id.clone())]).expect("delete");
            if self.state.contains_key(&(t.clone(), id.clone())) {
                self.state.insert((t, id), None);
            }
        } else {
            // Small value space, so some writes repeat the stored data (no-op upserts).
            let data = json!({"n": rng.random_range(0..4), "step": n % 3});
            upsert_entities(c, &[write(&t, &id, scope.as_deref(), data.clone())]).expect("upsert");
            self.state.insert((t, id), Some(data));
        }
    }

    /// What a terminal of `branch` must end up holding.
    fn truth(&self, branch: &str) -> std::collections::BTreeMap<String, serde_json::Value> {
        self.keys
            .iter()
            .filter(|(_, _, scope)| scope.as_deref().is_none_or(|s| s == branch))
            .filter_map(|(t, id, _)| {
                self.state
                    .get(&(t.clone(), id.clone()))
                    .cloned()
                    .flatten()
                    .map(|d| (EntityKey::new(t, id).to_string(), d))
            })
            .collect()
    }
}

/// Random catalog writes interleaved with a b1 terminal that snapshots in small pages (writes
/// land between its pages), then follows deltas; now and then tombstones are purged, which
/// forces the terminal to start over. Whatever the interleaving, the terminal must end with
/// exactly the model's truth for b1; then reconcile must repair a damaged copy exactly.
#[test]
fn seeded_interleavings_of_writes_snapshot_and_delta_converge_to_the_truth() {
    use rand::{Rng, SeedableRng};
    each_backend(|db| {
        for seed in 0..3u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut c = conn(db);
            // Seeds share the database; each gets its own id space.
            let mut model = Model::new();
            for k in &mut model.keys {
                k.1 = format!("s{seed}-{}", k.1);
            }
            for n in 0..40 {
                model.step(&mut c, &mut rng, n);
            }
            let mut replica = Replica::default();
            let mut since: Option<i64> = None; // None = must (re)snapshot
            let mut cursor: Option<String> = None;
            let mut snapshots = 0;
            for n in 40..300 {
                // A burst of writes (so the terminal falls behind by several pages), now and
                // then a purge of every tombstone.
                for _ in 0..rng.random_range(0..6) {
                    model.step(&mut c, &mut rng, n);
                }
                if rng.random_bool(0.04) {
                    purge_tombstones(&mut c, chrono::Duration::zero()).expect("purge");
                }
                // One terminal step: a snapshot page or a delta page.
                match since {
                    None => {
                        let limit = rng.random_range(1..4);
                        match snapshot_page(&mut c, "b1", cursor.as_deref(), limit) {
                            Ok(page) => {
                                if cursor.is_none() {
                                    replica = Replica::default();
                                    snapshots += 1;
                                }
                                for e in &page.entities {
                                    replica.apply(e);
                                }
                                cursor = page.next_cursor.clone();
                                if cursor.is_none() {
                                    since = Some(page.snapshot_version);
                                }
                            }
                            Err(CatalogError::BadCursor(_)) => cursor = None,
                            Err(e) => panic!("snapshot: {e}"),
                        }
                    }
                    Some(s) => match delta_page(&mut c, "b1", s, rng.random_range(1..4)) {
                        Ok(page) => {
                            for e in &page.changes {
                                replica.apply(e);
                            }
                            since = Some(page.next_since);
                        }
                        Err(CatalogError::ResnapshotRequired { .. }) => {
                            since = None;
                            cursor = None;
                        }
                        Err(e) => panic!("delta: {e}"),
                    },
                }
            }
            // Writes stop; the terminal finishes its snapshot (if any) and catches up.
            loop {
                match since {
                    None => {
                        let page =
                            snapshot_page(&mut c, "b1", cursor.as_deref(), 7).expect("snapshot");
                        if cursor.is_none() {
                            replica = Replica::default();
                        }
                        page.entities.iter().for_each(|e| replica.apply(e));
                        cursor = page.next_cursor.clone();
                        if cursor.is_none() {
                            since = Some(page.snapshot_version);
                        }
                    }
                    Some(s) => {
                        let page = delta_page(&mut c, "b1", s, 7).expect("delta");
                        page.changes.iter().for_each(|e| replica.apply(e));
                        since = Some(page.next_since);
                        if !page.has_more {
                            break;
                        }
                    }
                }
            }
            let truth = model.truth("b1");
            // Only this seed's keys (earlier seeds' keys share the database).
            let mine: std::collections::BTreeMap<String, serde_json::Value> = replica
                .live()
                .into_iter()
                .filter(|(k, _)| k.contains(&format!("/s{seed}-")))
                .collect();
            assert_eq!(
                mine, truth,
                "seed {seed}: replica != truth ({snapshots} snapshots)"
            );

            // Damage the copy (drop one, alter one, add another branch's key) and let
            // reconcile repair it: afterwards it must equal the truth again.
            let mut held: Vec<(String, String, String)> = mine
                .iter()
                .map(|(k, d)| {
                    let (t, id) = k.split_once('/').expect("key");
                    (t.to_string(), id.to_string(), entity_hash(d))
                })
                .collect();
            if held.len() > 2 {
                held.remove(0);
                held[0].2 = "0".repeat(64);
            }
            held.push(("price".into(), format!("s{seed}-k02"), "x".into()));
            held.sort();
            held.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
            let req = ReconcileRequest {
                mode: ReconcileMode::Plan,
                range: KeyRange {
                    after: Some(format!("price/s{seed}-")),
                    through: Some(format!("product/s{seed}-~")),
                },
                entries: held
                    .iter()
                    .map(|(t, id, h)| ManifestEntry {
                        entity_type: t.clone(),
                        id: id.clone(),
                        version: 1,
                        hash: h.clone(),
                    })
                    .collect(),
            };
            let resp = reconcile(&mut c, "b1", &req, 2000).expect("reconcile");
            let mut repaired: std::collections::BTreeMap<String, serde_json::Value> = held
                .iter()
                .map(|(t, id, _)| (EntityKey::new(t, id).to_string(), json!("stale")))
                .collect();
            for d in &resp.plan.deletes {
                repaired.remove(&EntityKey::new(&d.entity_type, &d.id).to_string());
            }
            for e in &resp.plan.upserts {
                repaired.insert(e.key().to_string(), e.data.clone());
            }
            for (k, d) in &mine {
                repaired.entry(k.clone()).and_modify(|v| {
                    if *v == json!("stale") {
                        *v = d.clone();
                    }
                });
            }
            // The range also holds earlier seeds' keys (the plan rightly upserts them, as the
            // manifest lacks them); compare this seed's keys.
            let this_seed = |k: &String| req.range.contains(k) && k.contains(&format!("/s{seed}-"));
            let repaired: std::collections::BTreeMap<String, serde_json::Value> =
                repaired.into_iter().filter(|(k, _)| this_seed(k)).collect();
            let expected: std::collections::BTreeMap<String, serde_json::Value> =
                truth.into_iter().filter(|(k, _)| this_seed(k)).collect();
            assert!(
                resp.summary.upserts + resp.summary.deletes >= 2,
                "the damage was seen"
            );
            assert_eq!(repaired, expected, "seed {seed}: reconcile did not repair");
        }
    });
}

/// The fingerprint tree and the leaf reconcile, against a terminal's view built the same way:
/// equal catalogs have equal trees; each kind of drift (edit, missing, extra, forged version)
/// is found in its leaf and planned exactly; other branches' entities never count.
#[test]
fn fingerprints_and_leaf_reconcile_find_drift_in_its_leaf() {
    use possync_protocol::fingerprint::{
        leaf_of, next_step, FingerprintTree, LeafReconcileRequest, NodeId,
    };
    each_backend(|db| {
        let mut c = conn(db);
        let writes: Vec<EntityWrite> = (0..200)
            .map(|i| {
                write(
                    "product",
                    &format!("p{i:03}"),
                    None,
                    json!({"name": format!("P{i}")}),
                )
            })
            .chain([write("price", "x", Some("b2"), json!({"amount_minor": 1}))])
            .collect();
        let stored = upsert_entities(&mut c, &writes).expect("upsert");
        let (version, tree) = fingerprint_tree(&mut c, "b1").expect("tree");
        assert_eq!(version, 201);
        assert_eq!(tree.count(), 200, "b2's price is not in b1's view");

        // The terminal's copy: identical, then tampered four ways.
        let mut held: Vec<(String, String, i64, String)> = stored
            .iter()
            .filter(|e| e.branch_id.is_none())
            .map(|e| {
                (
                    e.entity_type.clone(),
                    e.id.clone(),
                    e.version,
                    e.hash.clone(),
                )
            })
            .collect();
        let build = |rows: &[(String, String, i64, String)]| {
            let mut t = FingerprintTree::default();
            for (ty, id, v, h) in rows {
                t.add(&format!("{ty}/{id}"), *v, h);
            }
            t
        };
        assert_eq!(build(&held), tree);
        held[3].3 = "edited".into();
        held[7].2 += 500;
        let removed = held.remove(11);
        held.push(("product".into(), "zzz".into(), 1, "h".into()));
        let local = build(&held);

        let mut ask = NodeId::ROOT.children();
        let mut leaves = Vec::new();
        while !ask.is_empty() {
            let remote: Vec<_> = ask.iter().map(|n| tree.fingerprint(*n)).collect();
            let (next, found) = next_step(&local, &remote);
            leaves.extend(found);
            ask = next;
        }
        let mut expected: Vec<u32> = ["product/p003", "product/p007", "product/zzz"]
            .iter()
            .map(|k| leaf_of(k))
            .chain([leaf_of(&format!("product/{}", removed.1))])
            .collect();
        expected.sort_unstable();
        expected.dedup();
        leaves.sort_unstable();
        assert_eq!(leaves, expected);

        let entries: Vec<ManifestEntry> = held
            .iter()
            .filter(|(t, id, _, _)| leaves.contains(&leaf_of(&format!("{t}/{id}"))))
            .map(|(t, id, v, h)| ManifestEntry {
                entity_type: t.clone(),
                id: id.clone(),
                version: *v,
                hash: h.clone(),
            })
            .collect();
        let answer = reconcile_leaves(
            &mut c,
            "b1",
            &LeafReconcileRequest {
                mode: ReconcileMode::Plan,
                leaves: leaves.clone(),
                entries: entries.clone(),
            },
            2000,
        )
        .expect("reconcile");
        let mut upserts: Vec<String> = answer.plan.upserts.iter().map(|e| e.id.clone()).collect();
        upserts.sort();
        assert_eq!(
            upserts,
            vec!["p003".to_string(), "p007".into(), removed.1.clone()]
        );
        assert_eq!(answer.plan.deletes.len(), 1);
        assert_eq!(answer.plan.deletes[0].id, "zzz");
        assert_eq!(answer.summary.upserts, 3);
        assert_eq!(answer.catalog_version, 201);

        // Entries outside the named leaves, or leaves that do not exist, are refused.
        let outside = leaves
            .iter()
            .map(|l| (l + 1) % 4096)
            .find(|l| !leaves.contains(l))
            .expect("a leaf");
        let bad = reconcile_leaves(
            &mut c,
            "b1",
            &LeafReconcileRequest {
                mode: ReconcileMode::Verify,
                leaves: vec![outside],
                entries,
            },
            2000,
        );
        assert!(matches!(bad, Err(CatalogError::BadManifest(_))), "{bad:?}");
        let bad = reconcile_leaves(
            &mut c,
            "b1",
            &LeafReconcileRequest {
                mode: ReconcileMode::Verify,
                leaves: vec![4096],
                entries: vec![],
            },
            2000,
        );
        assert!(matches!(bad, Err(CatalogError::BadManifest(_))), "{bad:?}");
    });
}

mod untrusted_input {
    //! The cloud's own parsers of untrusted input: the snapshot cursor and reconcile range
    //! bounds. Whatever a client sends, they answer `Ok` with in-range values or a client
    //! error, never a panic; and every cursor the server hands out decodes back to itself.
    use super::*;
    use proptest::prelude::*;

    fn arb_key_part() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), "[a-z_]{0,40}", "[!-~]{0,130}"]
    }

    proptest! {
        #[test]
        fn any_cursor_text_decodes_or_is_a_bad_cursor(s in prop_oneof![any::<String>(), "[A-Za-z0-9_-]{0,200}"]) {
            match SnapshotCursor::decode(&s) {
                Ok(cur) => {
                    prop_assert!(cur.v >= 0 && cur.t >= 0);
                    prop_assert!(valid_entity_type(&cur.after.0) && valid_entity_id(&cur.after.1));
                }
                Err(e) => prop_assert!(matches!(e, CatalogError::BadCursor(_))),
            }
        }

        #[test]
        fn cursors_the_server_hands_out_decode_to_themselves(
            v in 0i64..i64::MAX, t in 0i64..i64::MAX, ty in "[a-z][a-z_]{0,31}", id in "[!-~]{1,128}"
        ) {
            let cur = SnapshotCursor { v, t, after: (ty, id) };
            let text = cur.encode().expect("encode");
            prop_assert_eq!(SnapshotCursor::decode(&text).expect("decode"), cur);
        }

        #[test]
        fn any_range_bound_parses_to_a_valid_key_or_is_a_bad_manifest(t in arb_key_part(), id in arb_key_part(), slash in any::<bool>()) {
            let b = if slash { format!("{t}/{id}") } else { format!("{t}{id}") };
            match parse_bound("after", Some(&b)) {
                Ok(Some((t, i))) => prop_assert!(valid_entity_type(t) && valid_entity_id(i) && !t.contains('\0') && !i.contains('\0')),
                Ok(None) => prop_assert!(false, "a present bound is never None"),
                Err(e) => prop_assert!(matches!(e, CatalogError::BadManifest(_))),
            }
        }
    }
}
