//! `POST /sales` idempotency keys in the store: a retry under the same key answers the
//! original receipt and stores nothing; the key with another request is refused; no key is
//! today's behaviour; keys survive a reopen, and a database of schema 6 migrates with its
//! sales intact and keyless.

mod fixtures;

use chrono::{DateTime, Utc};
use fixtures::*;
use possync_protocol::{ErrorCode, EventType};
use possync_terminal::store::schema;
use possync_terminal::store::{IdempotencyKey, KeyedSale, SqliteStore, TerminalStoreError};

fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::parse(s.as_bytes()).expect("key")
}

fn recorded(k: KeyedSale) -> (uuid::Uuid, i64) {
    match k {
        KeyedSale::Recorded(s) => (s.pos_id, s.local_event_id),
        other => panic!("expected a new sale, got {other:?}"),
    }
}

fn replayed(k: KeyedSale) -> (uuid::Uuid, i64) {
    match k {
        KeyedSale::Replayed {
            pos_id,
            local_event_id,
        } => (pos_id, local_event_id),
        other => panic!("expected a replay, got {other:?}"),
    }
}

#[test]
fn a_retry_with_the_same_key_and_request_answers_the_original_sale_and_stores_nothing() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store.save_enrollment(&enrollment()).expect("enroll");
    let k = key("0194b7a2-6c1e-7f00-8000-0000000000f1");
    let sale = payload("R-1", 2, 250);
    let first = recorded(
        store
            .enqueue_sale_keyed(&k, EventType::Sale, None, &sale)
            .expect("first"),
    );
    assert_eq!(first, (store.pos_id(), 1));
    // Without occurred_at the store stamped the first attempt's time; the retry comes later
    // and is still the same request.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let again = replayed(
        store
            .enqueue_sale_keyed(&k, EventType::Sale, None, &sale)
            .expect("retry"),
    );
    assert_eq!(again, first);
    assert_eq!(count(&path, "sales"), 1);
    assert_eq!(count(&path, "sync_journal"), 1);
    assert_eq!(
        count(
            &path,
            "sales WHERE idempotency_key = '0194b7a2-6c1e-7f00-8000-0000000000f1'
             AND length(request_hash) = 64 AND local_event_id = 1"
        ),
        1
    );
    // The next sale takes the next id: the replay consumed none.
    let next = recorded(
        store
            .enqueue_sale_keyed(&key("k-2"), EventType::Sale, None, &sale)
            .expect("next"),
    );
    assert_eq!(next.1, 2);
}

#[test]
fn the_same_key_with_another_request_is_refused_and_nothing_is_stored() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    let k = key("R-000042");
    let at: DateTime<Utc> = "2026-03-01T10:00:00Z".parse().expect("time");
    let sale = payload("R-000042", 1, 100);
    let first = recorded(
        store
            .enqueue_sale_keyed(&k, EventType::Sale, Some(at), &sale)
            .expect("first"),
    );
    let later: DateTime<Utc> = "2026-03-01T10:00:01Z".parse().expect("time");
    let other_requests = [
        (EventType::Sale, Some(at), payload("R-000042", 2, 100)),
        (EventType::Sale, Some(later), sale.clone()),
        (EventType::Sale, None, sale.clone()),
    ];
    for (event_type, occurred_at, p) in other_requests {
        let err = store
            .enqueue_sale_keyed(&k, event_type, occurred_at, &p)
            .expect_err("key reused");
        assert!(
            matches!(
                err,
                TerminalStoreError::IdempotencyKeyReused { ref key, local_event_id, pos_id }
                    if key == "R-000042" && local_event_id == first.1 && pos_id == first.0
            ),
            "{err}"
        );
        assert_eq!(err.code(), ErrorCode::PosLocalIdempotencyKeyReused);
    }
    assert_eq!(count(&path, "sales"), 1);
    assert_eq!(count(&path, "sync_journal"), 1);
    // The same instant written another way is the same request.
    let same_at: DateTime<Utc> = "2026-03-01T11:00:00+01:00".parse().expect("time");
    assert_eq!(
        replayed(
            store
                .enqueue_sale_keyed(&k, EventType::Sale, Some(same_at), &sale)
                .expect("replay")
        ),
        first
    );
}

#[test]
fn an_invalid_sale_under_a_used_key_is_invalid_not_a_replay() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    let k = key("k");
    store
        .enqueue_sale_keyed(&k, EventType::Sale, None, &payload("R-1", 1, 100))
        .expect("first");
    let mut bad = payload("R-1", 1, 100);
    bad.lines[0].total_minor = 99;
    let err = store
        .enqueue_sale_keyed(&k, EventType::Sale, None, &bad)
        .expect_err("invalid");
    assert!(matches!(err, TerminalStoreError::Invalid(_)), "{err}");
    // A fresh key with an invalid sale stores neither the sale nor the key.
    let fresh = key("fresh");
    assert!(store
        .enqueue_sale_keyed(&fresh, EventType::Sale, None, &bad)
        .is_err());
    assert_eq!(count(&path, "sales WHERE idempotency_key = 'fresh'"), 0);
    assert_eq!(count(&path, "sales"), 1);
}

#[test]
fn without_a_key_the_same_sale_twice_is_two_sales() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    let sale = payload("R-1", 1, 100);
    let a = store
        .enqueue_sale(EventType::Sale, Utc::now(), &sale)
        .expect("a");
    let b = store
        .enqueue_sale(EventType::Sale, Utc::now(), &sale)
        .expect("b");
    assert_ne!(a.local_event_id, b.local_event_id);
    assert_eq!(count(&path, "sales WHERE idempotency_key IS NULL"), 2);
    assert_eq!(count(&path, "sync_journal"), 2);
}

#[test]
fn a_key_survives_reopening_the_database() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    let k = key("R-7");
    let sale = payload("R-7", 3, 70);
    let first = recorded(
        store
            .enqueue_sale_keyed(&k, EventType::Refund, None, &sale)
            .expect("first"),
    );
    drop(store);
    let store = open(&path);
    assert_eq!(
        replayed(
            store
                .enqueue_sale_keyed(&k, EventType::Refund, None, &sale)
                .expect("after reopen")
        ),
        first
    );
    assert!(matches!(
        store.enqueue_sale_keyed(&k, EventType::Sale, None, &sale),
        Err(TerminalStoreError::IdempotencyKeyReused { .. })
    ));
    assert_eq!(count(&path, "sales"), 1);
}

#[test]
fn concurrent_requests_with_one_key_record_one_sale() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    // Two handles on the file: the daemon's shared connection and a second one (the CLI's
    // process, say). The IMMEDIATE transaction serialises them across connections too.
    let other = open(&path);
    let k = key("shared-key");
    let sale = payload("R-1", 1, 100);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
    let handles: Vec<_> = [&store, &other, &store, &other]
        .into_iter()
        .map(|s| {
            let (s, k, sale, barrier) = (s.clone(), k.clone(), sale.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                s.enqueue_sale_keyed(&k, EventType::Sale, None, &sale)
                    .expect("enqueue")
            })
        })
        .collect();
    let outcomes: Vec<KeyedSale> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let new: Vec<_> = outcomes
        .iter()
        .filter(|o| matches!(o, KeyedSale::Recorded(_)))
        .collect();
    assert_eq!(new.len(), 1, "{outcomes:?}");
    let receipt = recorded(*new[0]);
    for o in outcomes {
        let got = match o {
            KeyedSale::Recorded(s) => (s.pos_id, s.local_event_id),
            KeyedSale::Replayed {
                pos_id,
                local_event_id,
            } => (pos_id, local_event_id),
        };
        assert_eq!(got, receipt);
    }
    assert_eq!(count(&path, "sales"), 1);
    assert_eq!(count(&path, "sync_journal"), 1);
}

#[test]
fn a_schema_6_database_migrates_its_sales_keyless_and_then_takes_keys() {
    let (_dir, path) = temp_db();
    {
        let mut conn = raw(&path);
        schema::apply_pending(&mut conn, 6).expect("v6");
        conn.execute_batch(
            "INSERT INTO sales (pos_id, local_event_id, event_type, receipt_no, currency,
                                total_minor, payload, occurred_at, created_at)
             VALUES ('p', 1, 'sale', 'R-old', 'EUR', 100, '{}', 't', 't')",
        )
        .expect("a sale of schema 6");
    }
    let (store, report) = SqliteStore::open_with_report(&path).expect("open");
    assert_eq!(report.applied, vec![7]);
    assert!(
        report.backup_path.is_some(),
        "a file with data is backed up"
    );
    assert_eq!(
        count(
            &path,
            "sales WHERE receipt_no = 'R-old' AND idempotency_key IS NULL AND request_hash IS NULL"
        ),
        1
    );
    store
        .enqueue_sale_keyed(&key("k"), EventType::Sale, None, &payload("R-new", 1, 1))
        .expect("keyed sale after the migration");
    // The schema holds the rules whatever writes the row.
    let conn = raw(&path);
    for bad in [
        "INSERT INTO sales (pos_id, event_type, receipt_no, currency, total_minor, payload,
                            occurred_at, created_at, idempotency_key, request_hash)
         VALUES ('p', 'sale', 'x', 'EUR', 1, '{}', 't', 't', 'k2', NULL)",
        "INSERT INTO sales (pos_id, event_type, receipt_no, currency, total_minor, payload,
                            occurred_at, created_at, idempotency_key, request_hash)
         VALUES ('p', 'sale', 'x', 'EUR', 1, '{}', 't', 't', char(9), printf('%064d', 0))",
        "INSERT INTO sales (pos_id, event_type, receipt_no, currency, total_minor, payload,
                            occurred_at, created_at, idempotency_key, request_hash)
         VALUES ('p', 'sale', 'x', 'EUR', 1, '{}', 't', 't', 'k', printf('%064d', 0))",
    ] {
        assert!(conn.execute(bad, []).is_err(), "{bad}");
    }
}
