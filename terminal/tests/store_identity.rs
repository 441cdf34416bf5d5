//! The till's identity in its database: token changes keep everything, re-enrollment as another
//! terminal and forks start a new `pos_id`, carry-over moves unsent sales exactly once, and a
//! copied database file gets a new device nonce.

mod fixtures;

use chrono::Utc;
use fixtures::*;
use possync_actors::{DeliveryOutcome, LocalStore, TerminalCode, TransientFailure};
use possync_protocol::{ErrorCode, EventType, HeldKey, SaleEvent};
use possync_terminal::carry_over::decide;
use possync_terminal::store::{CarryDecision, CarryScope, ChangeReason, Enrollment, SqliteStore};
use uuid::Uuid;

fn sell(store: &SqliteStore, n: i64) -> i64 {
    store
        .enqueue_sale(
            EventType::Sale,
            Utc::now(),
            &payload(&format!("R-{n}"), 1, 100 + n),
        )
        .expect("enqueue")
        .journal_id
}

fn park(store: &SqliteStore, journal_ids: &[i64], code: ErrorCode) {
    store.claim_batch(100, Utc::now()).expect("claim");
    let outcomes: Vec<DeliveryOutcome> = journal_ids
        .iter()
        .map(|&journal_id| DeliveryOutcome::NeedsAttention {
            journal_id,
            code: code.into(),
            message: "m".into(),
        })
        .collect();
    store.record_outcomes(&outcomes).expect("record");
    // Whatever was claimed but not parked goes back, its outcome unknown (`NETWORK`): a
    // carry-over leaves it alone for the quiet time, which has passed by the time these tests
    // re-enroll.
    store.release_in_flight().expect("release");
    age_unanswered(store);
}

/// Every journal row's event, in journal order.
fn stored_events(path: &std::path::Path) -> Vec<SaleEvent> {
    let c = raw(path);
    let mut stmt = c
        .prepare("SELECT event FROM sync_journal ORDER BY journal_id")
        .expect("prepare");
    stmt.query_map([], |r| r.get::<_, String>(0))
        .expect("query")
        .map(|t| serde_json::from_str(&t.expect("row")).expect("event"))
        .collect()
}

/// Moves the rows whose last delivery went unanswered past the carry-over's quiet time.
fn age_unanswered(store: &SqliteStore) {
    let long_ago = (Utc::now()
        - chrono::TimeDelta::seconds(possync_terminal::store::identity::UNANSWERED_QUIET_SECS + 1))
    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    raw(store.path())
        .execute(
            "UPDATE sync_journal SET updated_at = ?1 WHERE last_error_code = 'NETWORK'",
            [long_ago],
        )
        .expect("age the rows");
}

fn other_terminal() -> Enrollment {
    Enrollment {
        terminal_id: Uuid::from_u128(0x9999),
        token: "new-token".into(),
        ..enrollment()
    }
}

#[test]
fn a_new_token_for_the_same_terminal_keeps_pos_and_releases_unauthorized_sales() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store.save_enrollment(&enrollment()).expect("enroll");
    let pos = store.pos_id();
    let ids: Vec<i64> = (1..=3).map(|n| sell(&store, n)).collect();
    park(&store, &ids[..2], ErrorCode::PosSyncUnauthorized);
    assert_eq!(store.outbox_counts().expect("counts").needs_attention, 2);

    let rotated = Enrollment {
        token: "rotated".into(),
        ..enrollment()
    };
    let saved = store.save_enrollment(&rotated).expect("token set");
    assert_eq!(saved.forked_to, None);
    assert_eq!(saved.released, 2);
    assert_eq!(store.pos_id(), pos, "same identity, same pos_id");
    let items = store.claim_batch(100, Utc::now()).expect("claim");
    assert_eq!(
        items
            .iter()
            .map(|i| i.event.local_event_id)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(store
        .carry_candidates(CarryScope::Everything)
        .expect("candidates")
        .is_empty());
}

#[test]
fn reenrolling_as_another_terminal_forks_and_carries_unsent_sales_over_exactly_once() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store.save_enrollment(&enrollment()).expect("enroll");
    let old_pos = store.pos_id();
    let ids: Vec<i64> = (1..=4).map(|n| sell(&store, n)).collect();
    // 1 synced; 2 parked (token revoked); 3 and 4 pending.
    store.claim_batch(1, Utc::now()).expect("claim 1");
    store
        .record_outcomes(&[DeliveryOutcome::Synced {
            journal_id: ids[0],
            cloud_event_id: None,
            duplicate: false,
        }])
        .expect("synced");
    park(&store, &ids[1..2], ErrorCode::PosSyncUnauthorized);
    let old_events = stored_events(&path);

    let saved = store.save_enrollment(&other_terminal()).expect("re-enroll");
    let new_pos = saved.forked_to.expect("another terminal: new pos_id");
    assert_ne!(new_pos, old_pos);
    assert_eq!(store.pos_id(), new_pos);
    // The old rows are not delivered under the new token until carried over.
    assert!(store
        .claim_batch(100, Utc::now())
        .expect("claim")
        .is_empty());
    // A sale made meanwhile starts the new pos at 1.
    let fresh = store
        .enqueue_sale(EventType::Sale, Utc::now(), &payload("R-new", 1, 5))
        .expect("enqueue");
    assert_eq!((fresh.pos_id, fresh.local_event_id), (new_pos, 1));

    let candidates = store
        .carry_candidates(CarryScope::Everything)
        .expect("candidates");
    assert_eq!(
        candidates
            .iter()
            .map(|c| c.local_event_id)
            .collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    // The cloud held sale 3 under the old key (an answer lost in flight) — and a stranger's
    // key 4 with another payload.
    let held = vec![
        HeldKey {
            terminal_id: enrollment().terminal_id,
            local_event_id: 3,
            payload_hash: old_events[2].payload_hash(),
            cloud_event_id: Uuid::from_u128(3),
        },
        HeldKey {
            terminal_id: enrollment().terminal_id,
            local_event_id: 4,
            payload_hash: "another sale".into(),
            cloud_event_id: Uuid::from_u128(4),
        },
    ];
    let decisions = decide(candidates, &held);
    let counts = store.apply_carry_over(&decisions).expect("carry over");
    assert_eq!(
        (counts.rekeyed, counts.already_held, counts.skipped),
        (2, 1, 0)
    );
    // Applying the same (now stale) decisions again changes nothing.
    let again = store.apply_carry_over(&decisions).expect("stale");
    assert_eq!(
        (again.rekeyed, again.already_held, again.skipped),
        (0, 0, 3)
    );

    let items = store.claim_batch(100, Utc::now()).expect("claim");
    let keys: Vec<(Uuid, Uuid, i64, String)> = items
        .iter()
        .map(|i| {
            (
                i.event.terminal_id,
                i.event.pos_id,
                i.event.local_event_id,
                i.event.payload.receipt_no.clone(),
            )
        })
        .collect();
    let t = other_terminal().terminal_id;
    assert_eq!(
        keys,
        vec![
            (t, new_pos, 1, "R-new".into()),
            (t, new_pos, 2, "R-2".into()),
            (t, new_pos, 3, "R-4".into()),
        ],
        "re-keyed in order after the sale made meanwhile; the held one is not sent again"
    );
    let report = store.journal_for_report().expect("report");
    assert!(report.contains(&(new_pos, 2, "in_flight".into())));
    let synced: Vec<_> = report.iter().filter(|r| r.2 == "synced").collect();
    assert_eq!(synced.len(), 2, "sale 1 and the held sale 3: {report:?}");
    let changes = store.identity_changes().expect("changes");
    assert_eq!(changes[0].reason, ChangeReason::Reenrolled);
    assert_eq!(changes[1].reason, ChangeReason::CarryOver);
    assert_eq!((changes[1].rekeyed, changes[1].already_held), (2, 1));
    assert!(store
        .carry_candidates(CarryScope::Everything)
        .expect("none left")
        .is_empty());
}

#[test]
fn a_clone_or_conflict_answer_forks_and_only_an_invalid_sale_stays_parked() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store.save_enrollment(&enrollment()).expect("enroll");
    let old_pos = store.pos_id();
    assert_eq!(store.fork_if_needed().expect("nothing to fork"), None);
    let ids: Vec<i64> = (1..=3).map(|n| sell(&store, n)).collect();
    park(&store, &ids[..1], ErrorCode::PosSyncPosCloned);
    park(&store, &ids[1..2], ErrorCode::PosSyncEventInvalid);
    let new_pos = store
        .fork_if_needed()
        .expect("fork")
        .expect("the cloud said: cloned");
    assert_ne!(new_pos, old_pos);
    assert_eq!(store.fork_if_needed().expect("once"), None);
    let decisions = decide(
        store
            .carry_candidates(CarryScope::Everything)
            .expect("candidates"),
        &[],
    );
    assert!(decisions
        .iter()
        .all(|d| matches!(d, CarryDecision::Rekey { .. })));
    store.apply_carry_over(&decisions).expect("carry");
    let items = store.claim_batch(100, Utc::now()).expect("claim");
    assert_eq!(
        items
            .iter()
            .map(|i| (
                i.event.pos_id,
                i.event.local_event_id,
                i.event.payload.receipt_no.clone()
            ))
            .collect::<Vec<_>>(),
        vec![(new_pos, 1, "R-1".into()), (new_pos, 3, "R-3".into())]
    );
    let parked = store
        .list_journal(
            Some(possync_terminal::store::JournalStatus::NeedsAttention),
            10,
        )
        .expect("parked");
    assert_eq!(parked.len(), 1, "an invalid sale stays for the operator");
    assert_eq!(parked[0].local_event_id, 2, "but under the new key");
    assert_eq!(
        parked[0].last_error_code.as_deref(),
        Some("POS_SYNC_EVENT_INVALID")
    );
    let changes = store.identity_changes().expect("changes");
    assert_eq!(changes[0].reason, ChangeReason::Cloned);
}

#[test]
fn a_copied_database_file_gets_a_new_device_and_pos_but_delivers_inherited_sales_under_their_keys()
{
    let (dir, path) = temp_db();
    let store = open(&path);
    store.save_enrollment(&enrollment()).expect("enroll");
    let (nonce, pos) = (store.device_nonce(), store.pos_id());
    sell(&store, 1);
    sell(&store, 2);
    drop(store);
    let original = open(&path);
    assert_eq!(original.device_nonce(), nonce, "same file, same device");
    assert_eq!(original.pos_id(), pos);

    let copy_path = dir.path().join("copy.db");
    std::fs::copy(&path, &copy_path).expect("copy");
    let copy = open(&copy_path);
    assert_ne!(copy.device_nonce(), nonce);
    assert_ne!(
        copy.pos_id(),
        pos,
        "the copy's own sales get a pos_id of their own"
    );
    assert_eq!(
        copy.inherited().expect("inherited"),
        vec![possync_terminal::store::Inherited {
            pos_id: pos,
            nonce,
            below: 3
        }]
    );
    assert_eq!(open(&copy_path).device_nonce(), copy.device_nonce(), "once");
    assert_eq!(
        open(&path).device_nonce(),
        nonce,
        "the original is untouched"
    );

    let own = copy
        .enqueue_sale(EventType::Sale, Utc::now(), &payload("R-copy", 1, 7))
        .expect("enqueue");
    assert_eq!((own.pos_id, own.local_event_id), (copy.pos_id(), 1));
    assert!(
        copy.carry_candidates(CarryScope::Everything)
            .expect("candidates")
            .is_empty(),
        "inherited sales are not re-keyed"
    );
    // One pos_id per batch: the inherited sales under their original keys, then its own.
    let first = copy.claim_batch(100, Utc::now()).expect("claim");
    let second = copy.claim_batch(100, Utc::now()).expect("claim");
    let keys = |items: &[possync_actors::OutboxItem]| -> Vec<(Uuid, i64)> {
        items
            .iter()
            .map(|i| (i.event.pos_id, i.event.local_event_id))
            .collect()
    };
    let mut all = vec![keys(&first), keys(&second)];
    all.sort();
    let mut expected = vec![vec![(pos, 1), (pos, 2)], vec![(copy.pos_id(), 1)]];
    expected.sort();
    assert_eq!(all, expected);
    assert_eq!(
        copy.identity_changes().expect("changes")[0].reason,
        ChangeReason::Copied
    );
}

#[test]
fn a_copy_enrolled_as_another_terminal_never_rekeys_the_sales_it_inherited() {
    // Till A's data directory provisions till B, which is enrolled as terminal #2 while A
    // still holds its unsent sales. The cloud holds none of them yet (`held` is empty), so a
    // carry-over in B would re-key them and A would later deliver them under their own keys:
    // two copies in the cloud. B must leave them alone, parked or not.
    let (dir, path) = temp_db();
    let store = open(&path);
    store.save_enrollment(&enrollment()).expect("enroll A");
    let pos_a = store.pos_id();
    let ids: Vec<i64> = (1..=3).map(|n| sell(&store, n)).collect();
    park(&store, &ids[2..], ErrorCode::PosSyncUnauthorized);
    drop(store);

    let copy_path = dir.path().join("copy.db");
    std::fs::copy(&path, &copy_path).expect("copy");
    let b = open(&copy_path);
    assert_eq!(b.inherited().expect("inherited").len(), 1);
    let saved = b.save_enrollment(&other_terminal()).expect("enroll B");
    assert!(saved.forked_to.is_some());
    let own = b
        .enqueue_sale(EventType::Sale, Utc::now(), &payload("R-b", 1, 9))
        .expect("enqueue");

    for scope in [CarryScope::OtherPosIds, CarryScope::Everything] {
        let candidates = b.carry_candidates(scope).expect("candidates");
        assert!(
            candidates.is_empty(),
            "{scope:?}: inherited rows offered for re-keying: {candidates:?}"
        );
    }
    // Even a pass with stale candidates read some other way re-keys nothing inherited: the
    // store's answer is the only input of the carry-over, so this is what B would do.
    let counts = b
        .apply_carry_over(&decide(
            b.carry_candidates(CarryScope::Everything).expect("c"),
            &[],
        ))
        .expect("carry");
    assert_eq!(counts.rekeyed, 0);

    // B delivers only its own sale; the inherited rows keep A's keys, untouched.
    let items = b.claim_batch(100, Utc::now()).expect("claim");
    assert_eq!(
        items
            .iter()
            .map(|i| (i.event.terminal_id, i.event.pos_id, i.event.local_event_id))
            .collect::<Vec<_>>(),
        vec![(other_terminal().terminal_id, own.pos_id, 1)]
    );
    let c = raw(&copy_path);
    let mut stmt = c
        .prepare(
            "SELECT pos_id, local_event_id, json_extract(event, '$.terminal_id') FROM sync_journal
             WHERE journal_id <= ?1 ORDER BY journal_id",
        )
        .expect("prepare");
    let kept: Vec<(String, i64, String)> = stmt
        .query_map([ids[2]], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .map(|r| r.expect("row"))
        .collect();
    let a_terminal = enrollment().terminal_id.to_string();
    assert_eq!(
        kept,
        vec![
            (pos_a.to_string(), 1, a_terminal.clone()),
            (pos_a.to_string(), 2, a_terminal.clone()),
            (pos_a.to_string(), 3, a_terminal),
        ]
    );
    assert!(b
        .identity_changes()
        .expect("changes")
        .iter()
        .all(|ch| ch.reason != ChangeReason::CarryOver));
}

#[test]
fn a_copy_marks_synced_the_inherited_sales_the_original_delivered_and_keeps_the_rest() {
    // As above: B is a copy of A enrolled as another terminal. A delivers sales 1 and 2 (the
    // cloud holds them, same keys and payloads); key 3 is held with another payload (not
    // this sale). B marks 1 and 2 synced, keeps 3 untouched and never offers its own sale.
    let (dir, path) = temp_db();
    let store = open(&path);
    store.save_enrollment(&enrollment()).expect("enroll A");
    let pos_a = store.pos_id();
    let ids: Vec<i64> = (1..=3).map(|n| sell(&store, n)).collect();
    park(&store, &ids[1..2], ErrorCode::PosSyncUnauthorized);
    let events = stored_events(&path);
    drop(store);

    let copy_path = dir.path().join("copy.db");
    std::fs::copy(&path, &copy_path).expect("copy");
    let b = open(&copy_path);
    assert!(
        b.inherited_left_to_original().expect("left").is_empty(),
        "not enrolled as another terminal yet: B delivers them itself"
    );
    b.save_enrollment(&other_terminal()).expect("enroll B");
    b.enqueue_sale(EventType::Sale, Utc::now(), &payload("R-b", 1, 9))
        .expect("enqueue");
    let left = b.inherited_left_to_original().expect("left");
    assert_eq!(
        left.iter()
            .map(|c| (c.pos_id, c.local_event_id))
            .collect::<Vec<_>>(),
        vec![(pos_a, 1), (pos_a, 2), (pos_a, 3)]
    );

    let key = |n: usize, hash: String| HeldKey {
        terminal_id: enrollment().terminal_id,
        local_event_id: events[n].local_event_id,
        payload_hash: hash,
        cloud_event_id: Uuid::from_u128(n as u128 + 1),
    };
    let held = vec![
        key(0, events[0].payload_hash()),
        key(1, events[1].payload_hash()),
        key(2, "another sale".into()),
    ];
    // What `carry_over::settle_inherited` applies: the held decisions only.
    let decisions: Vec<CarryDecision> = decide(left, &held)
        .into_iter()
        .filter(|d| matches!(d, CarryDecision::AlreadyHeld { .. }))
        .collect();
    let counts = b.apply_carry_over(&decisions).expect("apply");
    assert_eq!((counts.already_held, counts.rekeyed), (2, 0));

    let c = raw(&copy_path);
    let mut stmt = c
        .prepare(
            "SELECT pos_id, local_event_id, status FROM sync_journal
             WHERE journal_id <= ?1 ORDER BY journal_id",
        )
        .expect("prepare");
    let rows: Vec<(String, i64, String)> = stmt
        .query_map([ids[2]], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .map(|r| r.expect("row"))
        .collect();
    assert_eq!(
        rows,
        vec![
            (pos_a.to_string(), 1, "synced".to_string()),
            (pos_a.to_string(), 2, "synced".to_string()),
            (pos_a.to_string(), 3, "pending".to_string()),
        ],
        "held ones synced under their own keys, the other left as it was"
    );
    assert_eq!(
        b.inherited_left_to_original()
            .expect("left")
            .iter()
            .map(|c| c.local_event_id)
            .collect::<Vec<_>>(),
        vec![3]
    );
}

#[test]
fn a_row_whose_last_delivery_went_unanswered_waits_before_it_is_re_keyed() {
    // Four sales went out under A's key: one failed without an answer (its request may
    // still be committing in the cloud), one with a proxy's 504 (the upstream may still be at
    // work), one with the cloud's own 503 (answered: nothing of it is in progress), and one
    // was in flight when the daemon stopped (released by the restart). Right
    // after a re-enrollment as another terminal only the answered one may be carried over;
    // once the quiet time has passed since the unanswered attempts, all may.
    let (_dir, path) = temp_db();
    let store = open(&path);
    store.save_enrollment(&enrollment()).expect("enroll A");
    let ids: Vec<i64> = (1..=4).map(|n| sell(&store, n)).collect();
    store.claim_batch(100, Utc::now()).expect("claim");
    let now = Utc::now();
    let retry = |journal_id: i64, code: TerminalCode| DeliveryOutcome::RetryLater {
        journal_id,
        failure: TransientFailure::NoAnswer,
        failed_at: now,
        not_before: now,
        code,
        message: "m".into(),
    };
    store
        .record_outcomes(&[
            retry(ids[0], TerminalCode::Network),
            retry(ids[1], TerminalCode::Http(504)),
            retry(ids[2], ErrorCode::PosSyncStorageFailed.into()),
        ])
        .expect("record");
    // The fourth was in flight when the daemon stopped: as unanswered as a timeout.
    assert_eq!(store.release_in_flight().expect("restart"), 1);
    store.save_enrollment(&other_terminal()).expect("enroll B");

    let candidates = |store: &SqliteStore| -> Vec<i64> {
        store
            .carry_candidates(CarryScope::Everything)
            .expect("candidates")
            .iter()
            .map(|c| c.journal_id)
            .collect()
    };
    assert_eq!(candidates(&store), vec![ids[2]]);

    let long_ago = (Utc::now()
        - chrono::TimeDelta::seconds(possync_terminal::store::identity::UNANSWERED_QUIET_SECS + 1))
    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    raw(&path)
        .execute(
            "UPDATE sync_journal SET updated_at = ?1 WHERE journal_id IN (?2, ?3, ?4)",
            rusqlite::params![long_ago, ids[0], ids[1], ids[3]],
        )
        .expect("age the rows");
    assert_eq!(candidates(&store), ids);
}

#[test]
fn moving_the_data_directory_on_its_disk_or_reaching_it_by_a_link_is_not_a_copy() {
    let (dir, path) = temp_db();
    let store = open(&path);
    let (nonce, pos) = (store.device_nonce(), store.pos_id());
    drop(store);
    let moved_dir = dir.path().join("moved");
    std::fs::create_dir(&moved_dir).expect("dir");
    let moved = moved_dir.join("terminal.db");
    std::fs::rename(&path, &moved).expect("move");
    let store = open(&moved);
    assert_eq!((store.device_nonce(), store.pos_id()), (nonce, pos));
    drop(store);
    #[cfg(unix)]
    {
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&moved, &link).expect("symlink");
        let store = open(&link);
        assert_eq!((store.device_nonce(), store.pos_id()), (nonce, pos));
        assert!(store.identity_changes().expect("changes").is_empty());
    }
}

#[test]
fn rows_an_older_build_left_under_another_terminal_are_found_by_a_thorough_pass_only() {
    let (_dir, path) = temp_db();
    let store = open(&path);
    store.save_enrollment(&enrollment()).expect("enroll");
    sell(&store, 1);
    sell(&store, 2);
    // What a build from before till identity did on re-enrollment: a new terminal, same pos_id.
    raw(&path)
        .execute(
            "UPDATE sync_state SET value = ?1 WHERE key = 'enrollment'",
            [serde_json::to_string(&other_terminal()).expect("json")],
        )
        .expect("old-style re-enrollment");
    assert!(store.claim_batch(10, Utc::now()).expect("claim").is_empty());
    assert!(store
        .carry_candidates(CarryScope::OtherPosIds)
        .expect("cheap pass")
        .is_empty());
    let candidates = store
        .carry_candidates(CarryScope::Everything)
        .expect("thorough pass");
    assert_eq!(candidates.len(), 2);
    let counts = store
        .apply_carry_over(&decide(candidates, &[]))
        .expect("carry");
    assert_eq!(counts.rekeyed, 2);
    let items = store.claim_batch(10, Utc::now()).expect("claim");
    assert_eq!(
        items
            .iter()
            .map(|i| (i.event.terminal_id, i.event.local_event_id))
            .collect::<Vec<_>>(),
        vec![
            (other_terminal().terminal_id, 3),
            (other_terminal().terminal_id, 4)
        ]
    );
}
