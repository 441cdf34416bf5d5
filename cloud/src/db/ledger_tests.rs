//! Ledger tests, run against PostgreSQL and SQLite (the concurrency test on PostgreSQL).

use super::*;
use crate::db::test_support::{each_backend, postgres};
use chrono::Timelike;
use possync_protocol::EventType;

fn sale(terminal: Uuid, pos: Uuid, id: i64, receipt: &str, unit: i64) -> IngestRequest {
    IngestRequest::new(SaleEvent {
        terminal_id: terminal,
        pos_id: pos,
        local_event_id: id,
        branch_id: "b1".into(),
        event_type: EventType::Sale,
        occurred_at: "2026-11-25T10:00:00Z".parse().expect("time"),
        payload: possync_testkit::one_line_payload(receipt, 2, unit),
        chain_hash: None,
    })
}

fn accepted(o: &IngestOutcome) -> Uuid {
    match o {
        IngestOutcome::Accepted { cloud_event_id, .. } => *cloud_event_id,
        other => panic!("expected accepted, got {other:?}"),
    }
}

#[test]
fn accepted_then_duplicate_then_conflict() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
        let first = ingest_batch(
            &mut c,
            &[sale(t, p, 1, "R1", 250), sale(t, p, 2, "R2", 100)],
        )
        .expect("ingest");
        let id1 = accepted(&first[0]);
        let id2 = accepted(&first[1]);
        assert_ne!(id1, id2);
        assert_eq!(id1.get_version_num(), 7);

        let again = ingest_batch(
            &mut c,
            &[
                sale(t, p, 1, "R1", 250),
                sale(t, p, 2, "R2-changed", 100),
                sale(t, p, 3, "R3", 5),
            ],
        )
        .expect("ingest");
        assert_eq!(
            again[0],
            IngestOutcome::Duplicate {
                cloud_event_id: id1
            }
        );
        assert_eq!(
            again[1],
            IngestOutcome::Conflict {
                cloud_event_id: id2
            }
        );
        accepted(&again[2]);
        assert_eq!(count_sales(&mut c, Some("b1")).expect("count"), 3);
        assert_eq!(count_sales(&mut c, Some("b2")).expect("count"), 0);
        assert_eq!(count_sales(&mut c, None).expect("count"), 3);
    });
}

#[test]
fn keys_repeated_inside_one_batch_resolve_against_the_first() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
        let out = ingest_batch(
            &mut c,
            &[
                sale(t, p, 1, "R1", 250),
                sale(t, p, 1, "R1", 250),
                sale(t, p, 1, "R1-other", 250),
            ],
        )
        .expect("ingest");
        let id = accepted(&out[0]);
        assert_eq!(out[1], IngestOutcome::Duplicate { cloud_event_id: id });
        assert_eq!(out[2], IngestOutcome::Conflict { cloud_event_id: id });
        assert_eq!(count_sales(&mut c, None).expect("count"), 1);

        // Repeats of a key stored by an earlier batch resolve against the stored hash.
        let out = ingest_batch(
            &mut c,
            &[sale(t, p, 1, "R1-other", 250), sale(t, p, 1, "R1", 250)],
        )
        .expect("ingest");
        assert_eq!(out[0], IngestOutcome::Conflict { cloud_event_id: id });
        assert_eq!(out[1], IngestOutcome::Duplicate { cloud_event_id: id });
    });
}

#[test]
fn the_key_includes_terminal_and_pos() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
        let out = ingest_batch(
            &mut c,
            &[
                sale(t, p, 1, "R1", 250),
                sale(t, Uuid::now_v7(), 1, "R1", 250),
                sale(Uuid::now_v7(), p, 1, "R1", 250),
            ],
        )
        .expect("ingest");
        for o in &out {
            accepted(o);
        }
        assert_eq!(count_sales(&mut c, None).expect("count"), 3);
    });
}

#[test]
fn a_full_batch_of_500_is_stored_in_chunks() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
        let batch: Vec<IngestRequest> = (1..=500)
            .map(|i| sale(t, p, i, &format!("R{i}"), i))
            .collect();
        let out = ingest_batch(&mut c, &batch).expect("ingest");
        assert_eq!(out.len(), 500);
        let ids: HashSet<Uuid> = out.iter().map(accepted).collect();
        assert_eq!(ids.len(), 500);
        let again = ingest_batch(&mut c, &batch).expect("ingest");
        for (a, b) in out.iter().zip(&again) {
            assert_eq!(
                *b,
                IngestOutcome::Duplicate {
                    cloud_event_id: a.cloud_event_id().expect("stored")
                }
            );
        }
        assert_eq!(count_sales(&mut c, None).expect("count"), 500);
    });
}

#[test]
fn a_failing_batch_stores_nothing() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
        // local_event_id 0 bypasses validation here and violates the table's CHECK, so the
        // database fails mid-batch.
        let bad = sale(t, p, 0, "R0", 1);
        let err = ingest_batch(&mut c, &[sale(t, p, 1, "R1", 1), bad]);
        assert!(matches!(err, Err(StoreError::Refused(_))), "{err:?}");
        assert_eq!(count_sales(&mut c, None).expect("count"), 0);
        // The good event is not half-remembered: it is accepted on retry.
        let out = ingest_batch(&mut c, &[sale(t, p, 1, "R1", 1)]).expect("ingest");
        accepted(&out[0]);
    });
}

#[test]
fn the_database_refuses_to_change_or_remove_ingested_sales() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
        ingest_batch(&mut c, &[sale(t, p, 1, "R1", 250)]).expect("ingest");
        for sql in [
            "UPDATE sales_events SET total_minor = 0",
            "DELETE FROM sales_events",
            "UPDATE idempotency_ledger SET payload_hash = 'x'",
            "DELETE FROM idempotency_ledger",
        ] {
            let res = match &mut *c {
                DbConn::Pg(c) => diesel::sql_query(sql).execute(c),
                DbConn::Sqlite(c) => diesel::sql_query(sql).execute(c),
            };
            let err = res.expect_err(sql);
            assert!(err.to_string().contains("append-only"), "{sql}: {err}");
        }
        assert_eq!(count_sales(&mut c, None).expect("count"), 1);
    });
}

#[test]
fn sync_status_reports_contiguous_prefix_and_gaps_per_pos() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let t = Uuid::now_v7();
        let (pa, pb) = (Uuid::now_v7(), Uuid::now_v7());
        let mut batch: Vec<IngestRequest> = [1, 2, 3, 5, 7]
            .into_iter()
            .map(|i| sale(t, pa, i, &format!("A{i}"), 1))
            .collect();
        batch.extend((1..=4).map(|i| sale(t, pb, i, &format!("B{i}"), 1)));
        batch.push(sale(Uuid::now_v7(), pa, 4, "other terminal", 1));
        ingest_batch(&mut c, &batch).expect("ingest");

        let status = sync_status(&mut c, t, "b1").expect("status");
        assert_eq!(status.terminal_id, t);
        assert_eq!(status.branch_id, "b1");
        let mut by_pos: HashMap<Uuid, &PosIngestion> =
            status.pos.iter().map(|p| (p.pos_id, p)).collect();
        let a = by_pos.remove(&pa).expect("pos a");
        assert_eq!((a.highest_contiguous, a.total_events), (3, 5));
        assert_eq!(a.ids_above_gap, vec![5, 7]);
        let b = by_pos.remove(&pb).expect("pos b");
        assert_eq!((b.highest_contiguous, b.total_events), (4, 4));
        assert!(b.ids_above_gap.is_empty());
        assert!(by_pos.is_empty());

        let none = sync_status(&mut c, Uuid::now_v7(), "b1").expect("status");
        assert!(none.pos.is_empty());
    });
}

#[test]
fn sync_status_when_id_1_is_missing() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
        ingest_batch(&mut c, &[sale(t, p, 2, "R2", 1), sale(t, p, 3, "R3", 1)]).expect("ingest");
        let s = sync_status(&mut c, t, "b1").expect("status");
        assert_eq!(s.pos[0].highest_contiguous, 0);
        assert_eq!(s.pos[0].ids_above_gap, vec![2, 3]);
    });
}

/// The first gap, the ids above it and the fleet view's gap ranges are found in SQL, bounded,
/// and agree with a naive walk over every stored id; another terminal's ids under the same
/// `pos_id` are not counted; ids at the cap do not overflow anything.
#[test]
fn gaps_are_found_in_the_database_bounded_and_exact() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let (t, other, p) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        // 1..=4 missing, then every third id missing: ~1060 ids, ~530 holes.
        let ids: Vec<i64> = (5..=1600).filter(|i| i % 3 != 0).collect();
        let batch: Vec<IngestRequest> = ids
            .iter()
            .map(|i| sale(t, p, *i, &format!("R{i}"), 1))
            .collect();
        ingest_batch(&mut c, &batch).expect("ingest");
        // Another terminal fills some holes of the same pos_id: they are not `t`'s.
        ingest_batch(
            &mut c,
            &[sale(other, p, 1, "O1", 1), sale(other, p, 6, "O6", 1)],
        )
        .expect("ingest other");

        let status = sync_status(&mut c, t, "b1").expect("status");
        let mine = &status.pos[0];
        assert_eq!(mine.highest_contiguous, 0, "1 is missing");
        assert_eq!(mine.total_events, ids.len() as i64);
        assert_eq!(mine.ids_above_gap, ids[..MAX_IDS_ABOVE_GAP].to_vec());

        let mut naive = vec![(1, 4)];
        naive.extend(
            ids.windows(2)
                .filter(|w| w[1] > w[0] + 1)
                .map(|w| (w[0] + 1, w[1] - 1)),
        );
        let gaps = crate::db::journal_audit::pending_gaps(&mut c).expect("gaps");
        let g = gaps
            .iter()
            .find(|g| g.terminal_id == t.to_string())
            .expect("t has gaps");
        assert_eq!(
            g.missing,
            naive[..crate::db::journal_audit::MAX_GAP_RANGES].to_vec()
        );
        assert_eq!(g.missing_events, 1600 - ids.len() as i64);

        // A till whose prefix is whole up to a gap: contiguous up to it.
        let q = Uuid::now_v7();
        let prefix: Vec<IngestRequest> = [1, 2, 3, 7, 8]
            .into_iter()
            .map(|i| sale(t, q, i, &format!("Q{i}"), 1))
            .collect();
        ingest_batch(&mut c, &prefix).expect("ingest");
        let status = sync_status(&mut c, t, "b1").expect("status");
        let qs = status.pos.iter().find(|s| s.pos_id == q).expect("q");
        assert_eq!(
            (qs.highest_contiguous, qs.ids_above_gap.clone()),
            (3, vec![7, 8])
        );

        // The highest id validation accepts.
        let (t2, top) = (Uuid::now_v7(), Uuid::now_v7());
        let max = possync_protocol::MAX_LOCAL_EVENT_ID;
        ingest_batch(&mut c, &[sale(t2, top, max, "TOP", 1)]).expect("ingest max");
        let s = sync_status(&mut c, t2, "b1").expect("status");
        assert_eq!(
            (s.pos[0].highest_contiguous, s.pos[0].ids_above_gap.clone()),
            (0, vec![max])
        );
        let gaps = crate::db::journal_audit::pending_gaps(&mut c).expect("gaps");
        let g = gaps
            .iter()
            .find(|g| g.terminal_id == t2.to_string())
            .expect("t2");
        assert_eq!(
            (g.missing.clone(), g.missing_events),
            (vec![(1, max - 1)], max - 1)
        );
    });
}

/// Eight connections deliver the same key at the same moment: exactly one is accepted, the
/// other seven are duplicates naming the same `cloud_event_id`, and one row is stored. Each
/// thread opens its own pool, as separate cloud processes on one PostgreSQL would.
#[test]
fn eight_concurrent_deliveries_of_one_key_store_it_once() {
    const N: usize = 8;
    for round in 0..5 {
        let t = postgres();
        let (terminal, pos) = (Uuid::now_v7(), Uuid::now_v7());
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(N));
        let handles: Vec<_> = (0..N)
            .map(|_| {
                let url = t.url().to_string();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let db = crate::db::Database::connect(&url, 1).expect("own pool");
                    let mut c = db.conn().expect("conn");
                    let req = sale(terminal, pos, 1, "R1", 250);
                    barrier.wait();
                    ingest_batch(&mut c, &[req]).expect("ingest")[0]
                })
            })
            .collect();
        let outcomes: Vec<IngestOutcome> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        let winners: Vec<&IngestOutcome> = outcomes
            .iter()
            .filter(|o| matches!(o, IngestOutcome::Accepted { .. }))
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        let id = winners[0].cloud_event_id().expect("stored");
        for o in &outcomes {
            assert!(
                *o == IngestOutcome::Accepted {
                    cloud_event_id: id,
                    chain_break: false
                } || *o == IngestOutcome::Duplicate { cloud_event_id: id },
                "round {round}: {o:?}"
            );
        }
        let mut c = t.db.conn().expect("conn");
        assert_eq!(count_sales(&mut c, None).expect("count"), 1);
    }
}

/// Two connections ingest the same 500 keys at once (several INSERT chunks each), one in
/// order and one reversed, ten times. Claims are taken in one global key order, so neither
/// transaction can deadlock the other: every call succeeds and every key is accepted exactly
/// once. (Without the ordering PostgreSQL aborts one of them with "deadlock detected".)
#[test]
fn overlapping_batches_in_opposite_orders_do_not_deadlock() {
    const ROUNDS: i64 = 10;
    const KEYS: i64 = 500;
    let t = postgres();
    let (terminal, pos) = (Uuid::now_v7(), Uuid::now_v7());
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let handles: Vec<_> = [false, true]
        .into_iter()
        .map(|reversed| {
            let db = t.db.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = db.conn().expect("conn");
                let (mut accepted, mut failures) = (0, Vec::new());
                for round in 0..ROUNDS {
                    let mut batch: Vec<IngestRequest> = (1..=KEYS)
                        .map(|i| {
                            let id = round * KEYS + i;
                            sale(terminal, pos, id, &format!("R{id}"), 1)
                        })
                        .collect();
                    if reversed {
                        batch.reverse();
                    }
                    // Both threads reach the barrier every round, even after a failure, so a
                    // failure is reported instead of hanging the other thread.
                    barrier.wait();
                    match ingest_batch(&mut c, &batch) {
                        Ok(out) => {
                            accepted += out
                                .iter()
                                .filter(|o| matches!(o, IngestOutcome::Accepted { .. }))
                                .count() as i64
                        }
                        Err(e) => failures.push(format!("round {round}: {e}")),
                    }
                }
                (accepted, failures)
            })
        })
        .collect();
    let mut accepted = 0;
    let mut failures = Vec::new();
    for h in handles {
        let (a, f) = h.join().expect("thread");
        accepted += a;
        failures.extend(f);
    }
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(accepted, ROUNDS * KEYS);
    let mut c = t.db.conn().expect("conn");
    assert_eq!(count_sales(&mut c, None).expect("count"), ROUNDS * KEYS);
}

#[test]
fn held_keys_list_one_pos_across_terminals_in_pages() {
    each_backend(|db| {
        let mut conn = db.conn().expect("conn");
        let (old_terminal, new_terminal) = (Uuid::now_v7(), Uuid::now_v7());
        let (pos, other_pos) = (Uuid::new_v4(), Uuid::new_v4());
        let mut batch: Vec<IngestRequest> = (1..=3)
            .map(|i| sale(old_terminal, pos, i, &format!("R{i}"), 100))
            .collect();
        batch.push(sale(new_terminal, pos, 4, "R4", 100));
        batch.push(sale(old_terminal, other_pos, 1, "X1", 100));
        let hashes: Vec<String> = batch.iter().map(|r| r.payload_hash.clone()).collect();
        let outcomes = ingest_batch(&mut conn, &batch).expect("ingest");

        let page = held_keys(&mut conn, pos, 0, 2).expect("page 1");
        assert_eq!(page.pos_id, pos);
        assert_eq!(
            page.keys
                .iter()
                .map(|k| k.local_event_id)
                .collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(page.next_after, Some(2));
        assert_eq!(page.keys[0].terminal_id, old_terminal);
        assert_eq!(page.keys[0].payload_hash, hashes[0]);
        assert_eq!(page.keys[0].cloud_event_id, accepted(&outcomes[0]));

        let page = held_keys(&mut conn, pos, 2, 2).expect("page 2");
        assert_eq!(
            page.keys
                .iter()
                .map(|k| (k.terminal_id, k.local_event_id))
                .collect::<Vec<_>>(),
            vec![(old_terminal, 3), (new_terminal, 4)]
        );
        assert_eq!(page.next_after, None);
        assert!(held_keys(&mut conn, Uuid::new_v4(), 0, 10)
            .expect("unknown pos")
            .keys
            .is_empty());
    });
}

#[test]
fn a_held_keys_page_never_ends_inside_one_local_id() {
    each_backend(|db| {
        let mut conn = db.conn().expect("conn");
        let (t1, t2) = (Uuid::now_v7(), Uuid::now_v7());
        let pos = Uuid::new_v4();
        // One pos_id used by two terminals (before re-enrollment started a new pos_id).
        let batch = vec![
            sale(t1, pos, 1, "A1", 100),
            sale(t1, pos, 2, "A2", 100),
            sale(t2, pos, 2, "B2", 100),
            sale(t2, pos, 3, "B3", 100),
        ];
        ingest_batch(&mut conn, &batch).expect("ingest");
        let mut seen = Vec::new();
        let mut after = 0;
        loop {
            let page = held_keys(&mut conn, pos, after, 2).expect("page");
            seen.extend(page.keys.iter().map(|k| (k.local_event_id, k.terminal_id)));
            match page.next_after {
                Some(n) => after = n,
                None => break,
            }
        }
        seen.sort();
        let mut expected = vec![(1, t1), (2, t1), (2, t2), (3, t2)];
        expected.sort();
        assert_eq!(
            seen, expected,
            "every key once, none skipped at a page boundary"
        );
    });
}

/// `(receipt_no, occurred_at, payload)` as stored for `cloud_event_id`.
fn stored_row(c: &mut DbConn, id: Uuid) -> (String, NaiveDateTime, String) {
    use crate::db::schema::sales_events::dsl as s;
    let q = s::sales_events
        .filter(s::cloud_event_id.eq(id.to_string()))
        .select((s::receipt_no, s::occurred_at, s::payload));
    match c {
        DbConn::Pg(c) => q.first(c),
        DbConn::Sqlite(c) => q.first(c),
    }
    .expect("stored row")
}

/// The accepted ranges of `possync_protocol::validate_event` are exactly what both databases
/// store: any event inside them is stored and read back unchanged (time to the microsecond,
/// the precision of both `Timestamp` columns).
#[test]
fn every_valid_event_is_stored_unchanged_by_both_backends() {
    use possync_protocol::validate_event;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let text = |min: usize, max: usize| {
        prop_oneof![
            proptest::string::string_regex(&format!("[^\\x00]{{{min},{max}}}")).expect("regex"),
            proptest::string::string_regex(&format!("[\\x01-\\x1f\\x7f-\\u{{9f}}\\u{{d7ff}}\\u{{e000}}\\u{{fffd}}\\u{{10ffff}}a]{{{min},{max}}}"))
                .expect("regex"),
        ]
    };
    // 0001-01-01T00:00:00Z ..= 9999-12-31T23:59:59Z, any nanosecond.
    let instant = (-62_135_596_800i64..=253_402_300_799i64, 0u32..1_000_000_000);
    let strategy = (
        text(1, 64),
        text(1, 128),
        text(0, 128),
        text(0, 256),
        instant,
    );
    each_backend(|db| {
        // `TestRunner::run` takes an `Fn`: the connection and the id counter live in cells.
        let c = std::cell::RefCell::new(db.conn().expect("conn"));
        let terminal = Uuid::now_v7();
        let pos = Uuid::now_v7();
        let next_id = std::cell::Cell::new(0i64);
        let mut runner = TestRunner::new(Config {
            cases: 64,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&strategy, |(receipt, product, sku, name, (secs, nanos))| {
                next_id.set(next_id.get() + 1);
                let mut req = sale(terminal, pos, next_id.get(), &receipt, 100);
                let line = &mut req.event.payload.lines[0];
                line.product_id = product;
                line.sku = sku;
                line.name = name;
                req.event.occurred_at =
                    chrono::DateTime::from_timestamp(secs, nanos).expect("in chrono's range");
                prop_assert_eq!(validate_event(&req.event), Ok(()));
                let req = IngestRequest::new(req.event);
                let mut c = c.borrow_mut();
                let out = ingest_batch(&mut c, std::slice::from_ref(&req))
                    .map_err(|e| TestCaseError::fail(format!("not stored: {e}")))?;
                let id = accepted(&out[0]);
                let (r, at, payload) = stored_row(&mut c, id);
                prop_assert_eq!(&r, &req.event.payload.receipt_no);
                let sent = req.event.occurred_at.naive_utc();
                // Truncated to the microsecond on both backends.
                prop_assert_eq!(
                    at,
                    sent.with_nanosecond(sent.nanosecond() / 1000 * 1000)
                        .expect("µs")
                );
                let back: possync_protocol::SalePayload =
                    serde_json::from_str(&payload).expect("stored payload parses");
                prop_assert_eq!(back, req.event.payload);
                Ok(())
            })
            .expect("every valid event is stored unchanged");
    });
}

/// Why NUL is refused by validation: PostgreSQL's `text` cannot hold it. The refusal surfaces
/// as `Refused` (a row the database will not store), which group commit isolates.
#[test]
fn postgres_refuses_nul_in_text_as_a_row_refusal() {
    let t = postgres();
    let mut c = t.db.conn().expect("conn");
    let req = sale(Uuid::now_v7(), Uuid::now_v7(), 1, "R\0", 100);
    let err = ingest_batch(&mut c, &[req]);
    assert!(matches!(err, Err(StoreError::Refused(_))), "{err:?}");
    assert_eq!(count_sales(&mut c, None).expect("count"), 0);
}

#[test]
fn flags_are_stored_with_the_sale() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let mut ev = sale(Uuid::now_v7(), Uuid::now_v7(), 1, "R1", 100).event;
        ev.occurred_at = "1970-01-01T00:00:00Z".parse().expect("time");
        ev.payload = possync_testkit::one_line_payload("R1", 1, 100);
        let line = &mut ev.payload.lines[0];
        line.discount_minor = 150;
        line.total_minor = -50;
        ev.payload.totals.subtotal_minor = -50;
        ev.payload.totals.total_minor = -50;
        ev.payload.payments[0].amount_minor = -50;
        assert_eq!(possync_protocol::validate_event(&ev), Ok(()));
        let out = ingest_batch(&mut c, &[IngestRequest::new(ev.clone())]).expect("ingest");
        let id = accepted(&out[0]);
        assert_eq!(
            flags_of(&mut c, id).expect("flags"),
            ["clock_behind", "discount_exceeds_line"]
        );
        // A redelivery is a duplicate and writes no second set of flags.
        let again = ingest_batch(&mut c, &[IngestRequest::new(ev)]).expect("ingest");
        assert_eq!(again[0], IngestOutcome::Duplicate { cloud_event_id: id });
        assert_eq!(flags_of(&mut c, id).expect("flags").len(), 2);
        let plain = ingest_batch(&mut c, &[sale(Uuid::now_v7(), Uuid::now_v7(), 1, "R2", 1)])
            .expect("ingest");
        assert!(flags_of(&mut c, accepted(&plain[0]))
            .expect("flags")
            .is_empty());
    });
}

/// RFC 3339 allows a leap second (`23:59:60`); chrono parses it, and both backends must store
/// the sale (an edge the property test's generator does not reach).
#[test]
fn a_sale_in_a_leap_second_is_stored() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let mut req = sale(Uuid::now_v7(), Uuid::now_v7(), 1, "R1", 100);
        req.event.occurred_at = "2016-12-31T23:59:60.5Z".parse().expect("leap second");
        assert_eq!(possync_protocol::validate_event(&req.event), Ok(()));
        let req = IngestRequest::new(req.event);
        let out = ingest_batch(&mut c, std::slice::from_ref(&req)).expect("stored");
        let (_, at, _) = stored_row(&mut c, accepted(&out[0]));
        // Both backends hold the instant PostgreSQL reads `23:59:60.5` as.
        let next: NaiveDateTime = "2017-01-01T00:00:00.5".parse().expect("time");
        assert_eq!(at, next);
    });
}

/// Sales 1..=n of one till, chained as the till chains them.
fn chained(t: Uuid, p: Uuid, n: i64) -> Vec<IngestRequest> {
    let mut prev = possync_protocol::journal_chain::genesis(p);
    (1..=n)
        .map(|i| {
            let mut r = sale(t, p, i, &format!("R{i}"), 100 + i);
            let h = r.event.expected_chain_hash(&prev).expect("hash");
            r.event.chain_hash = Some(h.clone());
            prev = h;
            r
        })
        .collect()
}

fn breaks(o: &[IngestOutcome]) -> Vec<bool> {
    o.iter()
        .map(|o| {
            matches!(
                o,
                IngestOutcome::Accepted {
                    chain_break: true,
                    ..
                }
            )
        })
        .collect()
}

fn records(c: &mut DbConn) -> Vec<possync_protocol::journal_chain::AuditRecord> {
    let mut out = Vec::new();
    crate::db::journal_audit::export_journal(c, "b1", None, None, &mut |r| {
        out.push(r.clone());
        Ok(())
    })
    .expect("export");
    out
}

fn first_fault(
    rs: &[possync_protocol::journal_chain::AuditRecord],
) -> Option<(usize, possync_protocol::journal_chain::ChainFault)> {
    let mut v = possync_protocol::journal_chain::ChainVerifier::new();
    rs.iter()
        .enumerate()
        .find_map(|(i, r)| v.check(r).err().map(|f| (i, f)))
}

#[test]
fn a_sale_changed_after_chaining_is_stored_and_reported_as_exactly_one_break() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
        let mut batch = chained(t, p, 4);
        // Changed after the till chained it: a bigger total, same chain_hash.
        batch[2] = {
            let mut r = batch[2].clone();
            r.event.payload = possync_testkit::one_line_payload("R3", 2, 999);
            IngestRequest::new(r.event)
        };
        let out = ingest_batch(&mut c, &batch).expect("ingest");
        assert_eq!(breaks(&out), vec![false, false, true, false]);
        assert_eq!(count_sales(&mut c, Some("b1")).expect("count"), 4);
        let per_branch = crate::db::journal_audit::chain_breaks_per_branch(&mut c).expect("breaks");
        assert_eq!(per_branch.get("b1"), Some(&1));
        // The export shows the same break at the same record.
        let rs = records(&mut c);
        assert_eq!(rs.len(), 4);
        assert!(matches!(
            first_fault(&rs),
            Some((
                2,
                possync_protocol::journal_chain::ChainFault::Break {
                    local_event_id: 3,
                    ..
                }
            ))
        ));
    });
}

#[test]
fn out_of_order_arrival_verifies_and_a_gap_heals_when_the_missing_sale_arrives() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
        let all = chained(t, p, 5);
        // 4 and 5 first, then 1, then 3: 2 is missing in transit.
        for part in [&all[3..5], &all[0..1], &all[2..3]] {
            let out = ingest_batch(&mut c, part).expect("ingest");
            assert!(breaks(&out).iter().all(|b| !b), "{out:?}");
        }
        let gaps = crate::db::journal_audit::pending_gaps(&mut c).expect("gaps");
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps[0].missing, vec![(2, 2)]);
        assert!(matches!(
            first_fault(&records(&mut c)),
            Some((
                1,
                possync_protocol::journal_chain::ChainFault::Gap { from: 2, to: 2, .. }
            ))
        ));
        // 2 arrives: the gap is gone, and its link and 3's verify (no break anywhere).
        let out = ingest_batch(&mut c, &all[1..2]).expect("ingest");
        assert_eq!(breaks(&out), vec![false]);
        assert!(crate::db::journal_audit::pending_gaps(&mut c)
            .expect("gaps")
            .is_empty());
        assert!(crate::db::journal_audit::chain_breaks_per_branch(&mut c)
            .expect("breaks")
            .is_empty());
        let rs = records(&mut c);
        assert_eq!(rs.len(), 5);
        assert_eq!(first_fault(&rs), None);
    });
}

#[test]
fn a_late_predecessor_reveals_a_break_in_its_stored_successor() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
        let mut all = chained(t, p, 3);
        // 3 carries a hash that does not follow from 2.
        all[2].event.chain_hash = Some("0".repeat(64));
        ingest_batch(&mut c, &all[2..3]).expect("ingest 3");
        ingest_batch(&mut c, &all[0..1]).expect("ingest 1");
        let none = crate::db::journal_audit::chain_breaks_per_branch(&mut c).expect("breaks");
        assert!(none.is_empty(), "3 waits for 2: {none:?}");
        let out = ingest_batch(&mut c, &all[1..2]).expect("ingest 2");
        // 2 itself is intact; the break recorded is 3's.
        assert_eq!(breaks(&out), vec![false]);
        let b = crate::db::journal_audit::chain_breaks_of(&mut c, "b1").expect("breaks");
        assert_eq!(b, vec![(t.to_string(), p.to_string(), 3)]);
    });
}

/// Stores `req` as a concurrent transaction on another instance would have: the sale row
/// only, without seeing (so without verifying) its neighbours.
fn store_unseen(c: &mut DbConn, req: &IngestRequest) -> String {
    let id = Uuid::now_v7().to_string();
    let row = sales_row(req, &id, now_utc()).expect("row");
    match c {
        DbConn::Pg(c) => pg::store_sales(c, &[row]),
        DbConn::Sqlite(c) => sqlite::store_sales(c, &[row]),
    }
    .expect("store");
    id
}

#[test]
fn links_left_unverified_by_concurrent_instances_are_verified_by_the_recheck() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
        let mut events = chained(t, p, 5);
        // Event 4 is changed after chaining: the re-check must find that break too.
        events[3].event.payload = possync_testkit::one_line_payload("R4", 2, 999);
        let events: Vec<IngestRequest> = events
            .into_iter()
            .map(|r| IngestRequest::new(r.event))
            .collect();
        // Instance A ingests 1 and 3; instance B stored 2 and 4 in transactions that saw
        // neither 1 nor 3 (and A's did not see them): links 2, 3 and 4 are unverified. Event 5
        // has not arrived: it is not stored, and nothing links to it.
        ingest_batch(&mut c, &[events[0].clone()]).expect("ingest 1");
        ingest_batch(&mut c, &[events[2].clone()]).expect("ingest 3");
        store_unseen(&mut c, &events[1]);
        store_unseen(&mut c, &events[3]);
        let stored: Vec<i64> = records(&mut c).iter().map(|r| r.local_event_id).collect();
        assert_eq!(stored, vec![1, 2, 3, 4], "all four stored");

        let now = Utc::now();
        let hour = chrono::Duration::hours(1);
        let got = recheck_links(&mut c, now - hour, now + hour, 100).expect("recheck");
        let v: Vec<(i64, bool)> = got.iter().map(|l| (l.local_event_id, l.intact)).collect();
        assert_eq!(v, vec![(2, true), (3, true), (4, false)], "{got:?}");
        let per_branch = crate::db::journal_audit::chain_breaks_per_branch(&mut c).expect("breaks");
        assert_eq!(per_branch.get("b1"), Some(&1));
        // Nothing left: a second pass verifies nothing, and a window before the sales finds none.
        assert!(recheck_links(&mut c, now - hour, now + hour, 100)
            .expect("again")
            .is_empty());
        // Event 5 arrives through ingestion: its link is verified there, as always.
        let out = ingest_batch(&mut c, &[events[4].clone()]).expect("ingest 5");
        assert_eq!(breaks(&out), vec![false]);
        assert!(recheck_links(&mut c, now - hour, now + hour, 100)
            .expect("after 5")
            .is_empty());
    });
}

/// A till whose predecessors never arrive (ids 2, 4, 6, …) has only gaps, no link the re-check
/// could verify: those events must not fill its passes, or the links stored after them would
/// never be checked.
#[test]
fn events_waiting_for_a_missing_predecessor_do_not_starve_the_recheck() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let (t, holes, whole) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        // Older than anything else in the window: five events with a hole before each.
        for r in chained(t, holes, 10)
            .iter()
            .filter(|r| r.event.local_event_id % 2 == 0)
        {
            store_unseen(&mut c, r);
        }
        // Then a pos_id whose two events were stored unseen: links 1 and 2 await the re-check.
        let two = chained(t, whole, 2);
        store_unseen(&mut c, &two[0]);
        store_unseen(&mut c, &two[1]);

        let now = Utc::now();
        let hour = chrono::Duration::hours(1);
        // A pass of three: before the fix, three of the five gap events, and nothing verified.
        let got = recheck_links(&mut c, now - hour, now + hour, 3).expect("recheck");
        let v: Vec<(Uuid, i64, bool)> = got
            .iter()
            .map(|l| (l.pos_id, l.local_event_id, l.intact))
            .collect();
        assert_eq!(v, vec![(whole, 1, true), (whole, 2, true)], "{got:?}");
        // The gap events stay waiting, unselected; their predecessor's arrival links them.
        assert!(recheck_links(&mut c, now - hour, now + hour, 3)
            .expect("again")
            .is_empty());
        let m = match &mut *c {
            DbConn::Pg(c) => pg::unlinked(c, &id_floor(now - hour), &id_floor(now + hour), 100),
            DbConn::Sqlite(c) => {
                sqlite::unlinked(c, &id_floor(now - hour), &id_floor(now + hour), 100)
            }
        }
        .expect("unlinked");
        assert!(m.is_empty(), "gap events are not candidates: {m:?}");
        store_unseen(&mut c, &chained(t, holes, 1)[0]);
        let got = recheck_links(&mut c, now - hour, now + hour, 100).expect("after 1");
        let v: Vec<i64> = got.iter().map(|l| l.local_event_id).collect();
        assert_eq!(
            v,
            vec![1, 2],
            "1 arrived: its own link and 2's are verifiable, 4.. still wait"
        );
    });
}

/// `cloud audit export` pages by the full order key `(local_event_id, terminal_id)` and only
/// over the requested branch: one `pos_id` delivered under two terminals, with a page boundary
/// falling between the two rows of one id, loses nothing; a row of the same `pos_id` stored
/// under another branch is not exported as this branch's, and each record names its own branch.
#[test]
fn the_audit_export_pages_by_the_full_key_and_only_over_its_branch() {
    each_backend(|db| {
        let mut c = db.conn().expect("conn");
        let (a, b, p) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let (a, b) = (a.min(b), a.max(b));
        // The till re-enrolled as `b` re-delivered 1..=4 of its `pos_id`; `a` had them first.
        for t in [a, b] {
            let batch: Vec<IngestRequest> = (1..=4)
                .map(|i| sale(t, p, i, &format!("R{i}"), 100))
                .collect();
            ingest_batch(&mut c, &batch).expect("ingest");
        }
        // Then, under a third terminal of branch b2, the same pos_id's id 3.
        let other = Uuid::now_v7();
        let mut elsewhere = sale(other, p, 3, "R3", 100).event;
        elsewhere.branch_id = "b2".into();
        ingest_batch(&mut c, &[IngestRequest::new(elsewhere)]).expect("ingest b2");

        let export = |c: &mut DbConn, branch: &str, page: i64| {
            let mut out = Vec::new();
            crate::db::journal_audit::export_journal_paged(c, branch, None, None, page, &mut |r| {
                out.push((
                    r.local_event_id,
                    r.terminal_id.expect("terminal"),
                    r.branch_id.clone().expect("branch"),
                ));
                Ok(())
            })
            .expect("export");
            out
        };
        let want: Vec<(i64, Uuid, String)> = (1..=4)
            .flat_map(|i| [(i, a, "b1".to_string()), (i, b, "b1".to_string())])
            .collect();
        // Page sizes 1..=9: 3, 5 and 7 end a page between `a` and `b` of one id.
        for page in 1..=9 {
            assert_eq!(export(&mut c, "b1", page), want, "page size {page}");
        }
        assert_eq!(export(&mut c, "b2", 3), vec![(3, other, "b2".to_string())]);
    });
}

#[test]
fn ids_sort_by_time_so_a_window_is_an_id_range() {
    let t = Utc::now();
    let before = id_floor(t - chrono::Duration::milliseconds(1));
    let at = id_floor(t);
    let made = Uuid::now_v7().to_string();
    let after = id_floor(t + chrono::Duration::seconds(5));
    assert!(
        before < at && at <= made && made < after,
        "{before} {at} {made} {after}"
    );
    assert_eq!(at.len(), made.len());
}
