//! The sales outbox: atomic enqueue, validation, the journal state machine and the trigger
//! that makes a synced row final.

mod fixtures;

use chrono::{Duration, Utc};
use fixtures::*;
use possync_actors::{DeliveryOutcome, FailureHistory, LocalStore, TerminalCode, TransientFailure};
use possync_protocol::{validate_event, ErrorCode, EventType};
use possync_terminal::store::{JournalStatus, RetryTarget, TerminalStoreError};

#[test]
fn enqueue_assigns_strictly_increasing_ids_and_writes_sale_and_journal_together() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store.save_enrollment(&enrollment()).expect("enroll");
    let now = Utc::now();
    let mut ids = Vec::new();
    for i in 0..20 {
        let e = store
            .enqueue_sale(
                EventType::Sale,
                now,
                &payload(&format!("R-{i}"), 1 + i, 250),
            )
            .expect("enqueue");
        assert_eq!(e.pos_id, store.pos_id());
        ids.push(e.local_event_id);
    }
    assert_eq!(ids, (1..=20).collect::<Vec<i64>>(), "contiguous from 1");
    assert_eq!(count(&path, "sales"), 20);
    assert_eq!(count(&path, "sync_journal WHERE status = 'pending'"), 20);
    // every sale has its journal row with the same local_event_id and receipt
    assert_eq!(
        count(
            &path,
            "sales s JOIN sync_journal j ON j.pos_id = s.pos_id AND j.local_event_id = s.local_event_id
             AND json_extract(j.event, '$.payload.receipt_no') = s.receipt_no"
        ),
        20
    );
    // ids survive a reopen and continue
    drop(store);
    let store = open(&path);
    let e = store
        .enqueue_sale(EventType::Sale, now, &payload("R-after", 1, 1))
        .expect("enqueue");
    assert_eq!(e.local_event_id, 21);
}

#[test]
fn an_invalid_sale_is_refused_with_event_invalid_and_nothing_is_stored() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    let mut bad = payload("R-1", 2, 250);
    bad.lines[0].total_minor = 499;
    let err = store
        .enqueue_sale(EventType::Sale, Utc::now(), &bad)
        .expect_err("must refuse");
    assert!(matches!(err, TerminalStoreError::Invalid(_)), "{err}");
    assert_eq!(err.code(), ErrorCode::PosSyncEventInvalid);
    let mut refund_in_sale = payload("R-2", -1, 250);
    refund_in_sale.payments[0].amount_minor = -250;
    assert_eq!(
        store
            .enqueue_sale(EventType::Sale, Utc::now(), &refund_in_sale)
            .expect_err("negative qty in a sale")
            .code(),
        ErrorCode::PosSyncEventInvalid
    );
    assert_eq!(count(&path, "sales"), 0);
    assert_eq!(count(&path, "sync_journal"), 0);
    // and no id was consumed
    let e = store
        .enqueue_sale(EventType::Refund, Utc::now(), &refund_in_sale)
        .expect("valid as a refund");
    assert_eq!(e.local_event_id, 1);
}

#[test]
fn a_failing_journal_insert_leaves_neither_the_sale_nor_a_gap() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store
        .enqueue_sale(EventType::Sale, Utc::now(), &payload("R-1", 1, 100))
        .expect("first");
    let before_sales = dump(&path, "sales");
    let before_state = dump(&path, "sync_state");
    raw(&path)
        .execute_batch(
            "CREATE TRIGGER boom BEFORE INSERT ON sync_journal BEGIN SELECT RAISE(ABORT, 'disk says no'); END;",
        )
        .expect("install failure");
    let err = store
        .enqueue_sale(EventType::Sale, Utc::now(), &payload("R-2", 1, 100))
        .expect_err("must fail");
    assert_eq!(err.code(), ErrorCode::PosSyncStorageFailed, "{err}");
    assert_eq!(
        dump(&path, "sales"),
        before_sales,
        "sale rolled back with the journal row"
    );
    assert_eq!(
        dump(&path, "sync_state"),
        before_state,
        "id counter rolled back"
    );
    raw(&path)
        .execute_batch("DROP TRIGGER boom")
        .expect("remove failure");
    let e = store
        .enqueue_sale(EventType::Sale, Utc::now(), &payload("R-2", 1, 100))
        .expect("second");
    assert_eq!(e.local_event_id, 2, "no gap");
}

#[test]
fn a_synced_row_cannot_be_updated_or_deleted() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store.save_enrollment(&enrollment()).expect("enroll");
    let e = store
        .enqueue_sale(EventType::Sale, Utc::now(), &payload("R-1", 1, 100))
        .expect("enqueue");
    let claimed = store.claim_batch(10, Utc::now()).expect("claim");
    assert_eq!(claimed.len(), 1);
    store
        .record_outcomes(&[DeliveryOutcome::Synced {
            journal_id: e.journal_id,
            cloud_event_id: Some("c-1".into()),
            duplicate: false,
        }])
        .expect("record");
    let conn = raw(&path);
    let upd = conn.execute(
        "UPDATE sync_journal SET status = 'pending' WHERE journal_id = ?1",
        [e.journal_id],
    );
    assert!(
        upd.as_ref()
            .is_err_and(|err| err.to_string().contains("synced row cannot be changed")),
        "{upd:?}"
    );
    let del = conn.execute(
        "DELETE FROM sync_journal WHERE journal_id = ?1",
        [e.journal_id],
    );
    assert!(del.is_err(), "{del:?}");
    // receipts are append-only too
    assert!(conn.execute("DELETE FROM sales", []).is_err());
    assert!(conn
        .execute("UPDATE sales SET total_minor = 0", [])
        .is_err());
    // a repeated outcome for the synced row changes nothing and does not fail the batch
    let before = dump(&path, "sync_journal");
    store
        .record_outcomes(&[DeliveryOutcome::NeedsAttention {
            journal_id: e.journal_id,
            code: ErrorCode::PosSyncEventDuplicate.into(),
            message: "late".into(),
        }])
        .expect("ignored");
    assert_eq!(dump(&path, "sync_journal"), before);
    // and an operator retry cannot reopen it
    assert_eq!(
        store
            .retry_journal(RetryTarget::One(e.journal_id))
            .expect("retry"),
        0
    );
    let rows = store
        .list_journal(Some(JournalStatus::Synced), 10)
        .expect("list");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].cloud_event_id.as_deref(), Some("c-1"));
    assert_eq!(rows[0].attempts, 1);
    assert_eq!(rows[0].receipt_no.as_deref(), Some("R-1"));
}

#[test]
fn claim_record_release_and_retry_follow_the_state_machine() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store.save_enrollment(&enrollment()).expect("enroll");
    let t0 = Utc::now();
    let ids: Vec<i64> = (0..4)
        .map(|i| {
            store
                .enqueue_sale(EventType::Sale, t0, &payload(&format!("R-{i}"), 1, 100))
                .expect("enqueue")
                .journal_id
        })
        .collect();

    let first = store.claim_batch(2, t0).expect("claim");
    assert_eq!(
        first
            .iter()
            .map(|i| i.event.local_event_id)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    for item in &first {
        assert_eq!(item.attempts, 0);
        assert_eq!(item.event.terminal_id, enrollment().terminal_id);
        assert_eq!(item.event.branch_id, "b1");
        assert_eq!(item.event.pos_id, store.pos_id());
        validate_event(&item.event).expect("stored event is valid");
    }
    let c = store.outbox_counts().expect("counts");
    assert_eq!((c.pending, c.in_flight), (2, 2));
    assert!(c.oldest_pending_at.is_some());

    // a crash now: both in-flight rows go back to pending
    assert_eq!(store.release_in_flight().expect("release"), 2);
    assert_eq!(store.outbox_counts().expect("counts").pending, 4);

    let batch = store.claim_batch(10, t0).expect("claim all");
    assert_eq!(batch.len(), 4);
    let later = t0 + Duration::seconds(60);
    store
        .record_outcomes(&[
            DeliveryOutcome::Synced {
                journal_id: ids[0],
                cloud_event_id: Some("c0".into()),
                duplicate: false,
            },
            DeliveryOutcome::Synced {
                journal_id: ids[1],
                cloud_event_id: Some("c1".into()),
                duplicate: true,
            },
            DeliveryOutcome::RetryLater {
                journal_id: ids[2],
                failure: TransientFailure::NoAnswer,
                failed_at: t0,
                not_before: later,
                code: TerminalCode::Network,
                message: "connection refused".into(),
            },
            DeliveryOutcome::NeedsAttention {
                journal_id: ids[3],
                code: ErrorCode::PosSyncEventInvalid.into(),
                message: "rejected by the cloud".into(),
            },
        ])
        .expect("record");
    let c = store.outbox_counts().expect("counts");
    assert_eq!(
        (
            c.pending,
            c.in_flight,
            c.failed,
            c.synced,
            c.needs_attention
        ),
        (0, 0, 1, 2, 1)
    );
    assert_eq!(
        store
            .next_due_at()
            .expect("due")
            .map(|t| t.timestamp_micros()),
        Some(later.timestamp_micros())
    );

    // not due yet: nothing to claim; due: the failed row comes back with its attempt count
    assert!(store
        .claim_batch(10, t0 + Duration::seconds(59))
        .expect("claim")
        .is_empty());
    let again = store.claim_batch(10, later).expect("claim due");
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].journal_id, again[0].attempts), (ids[2], 1));

    let attention = store
        .list_journal(Some(JournalStatus::NeedsAttention), 10)
        .expect("list");
    assert_eq!(attention.len(), 1);
    assert_eq!(
        attention[0].last_error_code.as_deref(),
        Some("POS_SYNC_EVENT_INVALID")
    );
    assert_eq!(attention[0].attempts, 1);

    // operator retry: needs_attention → pending, attempts reset
    assert_eq!(
        store
            .retry_journal(RetryTarget::AllNeedingAttention)
            .expect("retry"),
        1
    );
    let pending = store
        .list_journal(Some(JournalStatus::Pending), 10)
        .expect("list");
    assert_eq!(pending.len(), 1);
    assert_eq!((pending[0].journal_id, pending[0].attempts), (ids[3], 0));
    assert_eq!(
        store
            .retry_journal(RetryTarget::One(ids[3]))
            .expect("retry pending"),
        0
    );

    let report = store.journal_for_report().expect("report");
    assert_eq!(
        report
            .iter()
            .map(|(p, id, st)| (*p, *id, st.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (store.pos_id(), 1, "synced"),
            (store.pos_id(), 2, "synced"),
            (store.pos_id(), 3, "in_flight"),
            (store.pos_id(), 4, "pending"),
        ]
    );
    assert_eq!(store.list_journal(None, 2).expect("limit").len(), 2);
}

#[test]
fn sales_queued_before_enrollment_wait_and_are_stamped_when_enrolled() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    assert_eq!(store.enrollment().expect("read"), None);
    store
        .enqueue_sale(EventType::Sale, Utc::now(), &payload("R-1", 1, 100))
        .expect("enqueue offline, unenrolled");
    assert!(
        store.claim_batch(10, Utc::now()).expect("claim").is_empty(),
        "no identity yet"
    );
    let mut bad = enrollment();
    bad.branch_id = "Branch One".into();
    let err = store.save_enrollment(&bad).expect_err("malformed branch");
    assert_eq!(err.code(), possync_protocol::ErrorCode::PosSyncUnauthorized);
    assert_eq!(store.enrollment().expect("read"), None, "nothing saved");
    store.save_enrollment(&enrollment()).expect("enroll");
    assert_eq!(store.enrollment().expect("read"), Some(enrollment()));
    assert!(
        !format!("{:?}", enrollment()).contains("secret-token"),
        "token redacted"
    );
    let items = store.claim_batch(10, Utc::now()).expect("claim");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].event.terminal_id, enrollment().terminal_id);
    validate_event(&items[0].event).expect("valid after stamping");
}

#[test]
fn the_outbox_never_writes_sales_or_local_inventory() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store.save_enrollment(&enrollment()).expect("enroll");
    store.adjust_local_inventory("p-coffee", 10).expect("stock");
    let ids: Vec<i64> = (0..3)
        .map(|i| {
            store
                .enqueue_sale(
                    EventType::Sale,
                    Utc::now(),
                    &payload(&format!("R-{i}"), 1, 100),
                )
                .expect("enqueue")
                .journal_id
        })
        .collect();
    let sales = dump(&path, "sales");
    let stock = dump(&path, "local_inventory");
    store.release_in_flight().expect("release");
    store.claim_batch(10, Utc::now()).expect("claim");
    store
        .record_outcomes(&[
            DeliveryOutcome::Synced {
                journal_id: ids[0],
                cloud_event_id: None,
                duplicate: false,
            },
            DeliveryOutcome::RetryLater {
                journal_id: ids[1],
                failure: TransientFailure::CloudAnswered { blamed: false },
                failed_at: Utc::now(),
                not_before: Utc::now(),
                code: TerminalCode::Http(503),
                message: "x".into(),
            },
            DeliveryOutcome::NeedsAttention {
                journal_id: ids[2],
                code: TerminalCode::Http(500),
                message: "m".into(),
            },
        ])
        .expect("record");
    store
        .retry_journal(RetryTarget::AllNeedingAttention)
        .expect("retry");
    assert_eq!(dump(&path, "sales"), sales);
    assert_eq!(dump(&path, "local_inventory"), stock);
}

#[test]
fn local_inventory_belongs_to_the_till() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    assert_eq!(store.local_inventory("p1").expect("read"), None);
    assert_eq!(store.adjust_local_inventory("p1", 5).expect("add"), 5);
    assert_eq!(store.adjust_local_inventory("p1", -7).expect("sell"), -2);
    assert_eq!(store.local_inventory("p1").expect("read"), Some(-2));
}

#[test]
fn two_handles_on_one_file_enqueue_concurrently_without_duplicates_or_gaps() {
    // the daemon and a `terminal sale add` each hold their own connection to the file
    let (_dir, path) = temp_db();
    let a = open(&path);
    let b = open(&path);
    let writers: Vec<_> = [a, b]
        .into_iter()
        .enumerate()
        .map(|(w, store)| {
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| {
                        store
                            .enqueue_sale(
                                EventType::Sale,
                                Utc::now(),
                                &payload(&format!("W{w}-{i}"), 1, 100),
                            )
                            .expect("enqueue under contention")
                            .local_event_id
                    })
                    .collect::<Vec<i64>>()
            })
        })
        .collect();
    let mut ids: Vec<i64> = writers
        .into_iter()
        .flat_map(|h| h.join().expect("writer thread"))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=100).collect::<Vec<i64>>());
    assert_eq!(count(&path, "sales"), 100);
    assert_eq!(count(&path, "sync_journal"), 100);
}

#[test]
fn failure_history_round_trips_and_an_operator_retry_clears_it() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store.save_enrollment(&enrollment()).expect("enroll");
    store
        .enqueue_sale(EventType::Sale, Utc::now(), &payload("R-1", 1, 100))
        .expect("enqueue");
    let t0 = Utc::now();
    let claimed = store.claim_batch(10, t0).expect("claim");
    assert_eq!(claimed[0].history, FailureHistory::default());
    let failed_at = t0 + Duration::seconds(1);
    store
        .record_outcomes(&[DeliveryOutcome::RetryLater {
            journal_id: claimed[0].journal_id,
            failure: TransientFailure::CloudAnswered { blamed: true },
            failed_at,
            not_before: t0,
            code: TerminalCode::STORAGE_FAILED,
            message: "m".into(),
        }])
        .expect("record");
    let again = store.claim_batch(10, t0).expect("claim");
    let expected = FailureHistory::default()
        .after(TransientFailure::CloudAnswered { blamed: true }, failed_at);
    assert_eq!(again[0].history.answered_failures, 1);
    assert_eq!(again[0].history.sale_failures, 1);
    assert_eq!(
        again[0]
            .history
            .last_failed_at
            .map(|t| t.timestamp_millis()),
        expected.last_failed_at.map(|t| t.timestamp_millis())
    );
    store
        .record_outcomes(&[DeliveryOutcome::RetryLater {
            journal_id: again[0].journal_id,
            failure: TransientFailure::NoAnswer,
            failed_at,
            not_before: t0,
            code: TerminalCode::Network,
            message: "m".into(),
        }])
        .expect("record");
    let third = store.claim_batch(10, t0).expect("claim");
    assert_eq!(third[0].attempts, 2);
    assert_eq!(
        (
            third[0].history.answered_failures,
            third[0].history.sale_failures
        ),
        (1, 1),
        "no answer moves neither counter"
    );
    store
        .record_outcomes(&[DeliveryOutcome::NeedsAttention {
            journal_id: third[0].journal_id,
            code: TerminalCode::AttemptsExhausted,
            message: "m".into(),
        }])
        .expect("record");
    store
        .retry_journal(RetryTarget::AllNeedingAttention)
        .expect("retry");
    let fresh = store.claim_batch(10, t0).expect("claim");
    assert_eq!(fresh[0].attempts, 0);
    assert_eq!(fresh[0].history, FailureHistory::default());
}

/// What migration 0007 added (idempotency keys), removed again: the step before [`UNDO_0006`].
const UNDO_0007: &str = "DROP INDEX sales_idempotency_key;
     ALTER TABLE sales DROP COLUMN request_hash;
     ALTER TABLE sales DROP COLUMN idempotency_key;
     DELETE FROM schema_migrations WHERE version = 7;\n";

/// What migration 0006 added, removed again (to make a file an older version left behind).
const UNDO_0006: &str = "DROP TRIGGER sync_journal_chain_hash_fixed;
     ALTER TABLE sync_journal DROP COLUMN chain_hash;
     DELETE FROM schema_migrations WHERE version = 6;\n";

/// Rings up the sales `R-i` for each `i` in `ids` (one line of 100).
fn sell(store: &possync_terminal::store::SqliteStore, ids: std::ops::RangeInclusive<i64>) {
    for i in ids {
        store
            .enqueue_sale(
                EventType::Sale,
                Utc::now(),
                &payload(&format!("R-{i}"), 1, 100),
            )
            .expect("enqueue");
    }
}

/// A fresh, enrolled store holding sales `R-1`..`R-n`, closed again.
fn enrolled_journal(n: i64) -> (tempfile::TempDir, std::path::PathBuf) {
    let (dir, path) = temp_db();
    let store = open(&path);
    store.save_enrollment(&enrollment()).expect("enroll");
    sell(&store, 1..=n);
    (dir, path)
}

/// `terminal outbox list` and `GET /outbox` show the newest rows first, and a limit keeps the
/// newest: an operator looking at a long history sees today's sales, not the first ones.
#[test]
fn the_journal_lists_newest_first_and_a_limit_keeps_the_newest() {
    let (_dir, path) = enrolled_journal(5);
    let store = open(&path);
    let receipts = |rows: Vec<possync_terminal::store::JournalRow>| -> Vec<String> {
        rows.into_iter()
            .map(|r| r.receipt_no.unwrap_or_default())
            .collect()
    };
    assert_eq!(
        receipts(store.list_journal(None, 100).expect("list")),
        vec!["R-5", "R-4", "R-3", "R-2", "R-1"]
    );
    assert_eq!(
        receipts(store.list_journal(None, 2).expect("limit")),
        vec!["R-5", "R-4"]
    );
    assert_eq!(
        receipts(
            store
                .list_journal(Some(JournalStatus::Pending), 3)
                .expect("by state")
        ),
        vec!["R-5", "R-4", "R-3"]
    );
}

/// Migration 0005 releases the sales an earlier version parked after unanswered attempts, and
/// nothing else: a sale the cloud refused, or one parked for its own failure, stays put.
#[test]
fn upgrading_releases_sales_parked_by_an_outage_and_only_those() {
    let (_dir, path) = enrolled_journal(6);
    // Make the file what version 4 left behind: no history columns, rows parked as it did.
    let conn = raw(&path);
    let parked = [
        (1, "POS_SYNC_ATTEMPTS_EXHAUSTED", "gave up after 12 attempts; last error NETWORK: cloud unreachable: connection refused"),
        (2, "POS_SYNC_ATTEMPTS_EXHAUSTED", "gave up after 12 attempts; last error HTTP_502: cloud answered 502: bad gateway"),
        (3, "POS_SYNC_ATTEMPTS_EXHAUSTED", "gave up after 12 attempts; last error POS_SYNC_RATE_LIMITED: cloud answered 429: slow down"),
        (4, "POS_SYNC_ATTEMPTS_EXHAUSTED", "gave up after 12 attempts; last error POS_SYNC_STORAGE_FAILED: cloud answered 503: storage failed"),
        (5, "POS_SYNC_EVENT_INVALID", "rejected by the cloud"),
        (6, "POS_SYNC_UNAUTHORIZED", "cloud answered 401: unauthorized"),
    ];
    for (id, code, message) in parked {
        conn.execute(
            "UPDATE sync_journal SET status = 'needs_attention', attempts = 12, last_error_code = ?2,
                 last_error_message = ?3 WHERE local_event_id = ?1",
            rusqlite::params![id, code, message],
        )
        .expect("park");
    }
    conn.execute_batch(
        &(UNDO_0007.to_string()
            + UNDO_0006
            + "ALTER TABLE sync_journal DROP COLUMN answered_failures;
         ALTER TABLE sync_journal DROP COLUMN sale_failures;
         ALTER TABLE sync_journal DROP COLUMN last_failed_at;
         DELETE FROM schema_migrations WHERE version = 5;
         PRAGMA user_version = 4;"),
    )
    .expect("downgrade");
    drop(conn);

    let store = open(&path);
    let status_of = |id: i64| -> String {
        raw(&path)
            .query_row(
                "SELECT status FROM sync_journal WHERE local_event_id = ?1",
                [id],
                |r| r.get(0),
            )
            .expect("row")
    };
    for id in 1..=4 {
        assert_eq!(status_of(id), "pending", "sale {id} released");
    }
    assert_eq!(status_of(5), "needs_attention");
    assert_eq!(status_of(6), "needs_attention");
    let c = store.outbox_counts().expect("counts");
    assert_eq!(
        (c.pending, c.needs_attention),
        (4, 2),
        "trigger-kept counts follow"
    );
    // history kept: attempts and the last error stay as they were
    assert_eq!(
        count(
            &path,
            "sync_journal WHERE attempts = 12 AND last_error_code = 'POS_SYNC_ATTEMPTS_EXHAUSTED'"
        ),
        4
    );
}

/// Migration 0006 rewrites nothing: sales already in the journal stay unchained, and each
/// `pos_id`'s chain starts at its first sale enqueued after it (docs/journal-chain.md). The
/// journal then verifies; a chained sale edited in the file does not.
#[test]
fn the_chain_starts_at_the_migration_and_an_edit_after_it_shows() {
    use possync_protocol::journal_chain::{ChainFault, ChainVerifier};
    let (_dir, path) = enrolled_journal(2);
    // What version 5 left behind: the same rows, no chain.
    raw(&path)
        .execute_batch(&(UNDO_0007.to_string() + UNDO_0006 + "PRAGMA user_version = 5;"))
        .expect("downgrade");
    let store = open(&path);
    sell(&store, 3..=4);
    let verify = |store: &possync_terminal::store::SqliteStore| {
        let mut v = ChainVerifier::new();
        for r in store.audit_records().expect("records") {
            v.check(&r)?;
        }
        Ok::<_, ChainFault>(v)
    };
    let records = store.audit_records().expect("records");
    let chained: Vec<bool> = records.iter().map(|r| r.chain_hash.is_some()).collect();
    assert_eq!(chained, vec![false, false, true, true]);
    let v = verify(&store).expect("intact");
    assert_eq!((v.records, v.links_verified), (4, 2));

    raw(&path)
        .execute(
            "UPDATE sync_journal SET event = json_set(event, '$.payload.receipt_no', 'X')
             WHERE local_event_id = 4",
            [],
        )
        .expect("edit");
    assert!(matches!(
        verify(&store),
        Err(ChainFault::Break {
            local_event_id: 4,
            ..
        })
    ));
    // The link cannot be re-pointed without re-keying the row.
    assert!(raw(&path)
        .execute(
            "UPDATE sync_journal SET chain_hash = ?1 WHERE local_event_id = 4",
            ["0".repeat(64)],
        )
        .is_err());
}
