//! The branch ingestion actors against a real database: group commit (many requests, few
//! transactions, each request its own outcomes), the queue bound, and restart after idle stop.

use std::time::Duration;

use possync_cloud::db::ledger::{IngestOutcome, IngestRequest};
use possync_cloud::db::{terminals, Database};
use possync_cloud::ingest::{Ingest, IngestError, IngestRegistry, IngestSettings};
use possync_cloud::metrics::Metrics;
use possync_testkit::pg::TestDatabase;
use possync_testkit::sample_sale_event;
use uuid::Uuid;

/// Keeps the database alive for the test (dropping it deletes it).
#[allow(dead_code)]
enum Db {
    Pg(TestDatabase),
    Sqlite(tempfile::TempDir),
}

fn open(kind: &str) -> (Database, Db) {
    let (url, keep) = match kind {
        "pg" => {
            let t = TestDatabase::create().expect("PostgreSQL must be reachable");
            (t.url.clone(), Db::Pg(t))
        }
        _ => {
            let dir = tempfile::tempdir().expect("temp dir");
            (
                format!("sqlite://{}", dir.path().join("cloud.db").display()),
                Db::Sqlite(dir),
            )
        }
    };
    let db = Database::connect(&url, 4).expect("connect");
    db.run_migrations().expect("migrate");
    (db, keep)
}

fn batch(terminal: Uuid, pos: Uuid, ids: std::ops::RangeInclusive<i64>) -> Vec<IngestRequest> {
    ids.map(|i| IngestRequest::new(sample_sale_event(terminal, pos, i, "b1")))
        .collect()
}

fn terminal(db: &Database) -> Uuid {
    let mut conn = db.conn().expect("conn");
    terminals::add_terminal(&mut conn, "b1", None)
        .expect("add terminal")
        .terminal_id
}

async fn group_commit_batches_queued_requests(kind: &str) {
    let (db, _keep) = open(kind);
    let metrics = Metrics::new();
    let t = terminal(&db);
    let pos = Uuid::now_v7();
    let actor = actix::Actor::start(possync_cloud::ingest::BranchIngestor::new(
        "b1".into(),
        db.clone(),
        metrics.clone(),
        IngestSettings::default(),
    ));
    // Ten requests of three events each, all in the mailbox before the actor runs: the first
    // starts a commit, the other nine queue behind it and share the next one.
    let send = |b| {
        let (msg, answer) = Ingest::new(b);
        actor.do_send(msg);
        answer
    };
    let pending: Vec<_> = (0..10)
        .map(|r| send(batch(t, pos, r * 3 + 1..=r * 3 + 3)))
        .collect();
    // A repeat of request 0's events inside the same group: duplicates, not new rows.
    let repeat = send(batch(t, pos, 1..=3));
    for (r, p) in pending.into_iter().enumerate() {
        let outcomes = p.get().await.expect("stored");
        assert_eq!(
            outcomes.len(),
            3,
            "request {r} gets exactly its own outcomes"
        );
        for o in outcomes {
            assert!(
                matches!(o, IngestOutcome::Accepted { .. }),
                "request {r}: {o:?}"
            );
        }
    }
    let again = repeat.get().await.expect("stored");
    assert!(
        again
            .iter()
            .all(|o| matches!(o, IngestOutcome::Duplicate { .. })),
        "{again:?}"
    );
    let commits = metrics.ingest_batch_size.get_sample_count();
    assert!(
        commits <= 3,
        "11 queued requests should share a few transactions, took {commits}"
    );
    assert_eq!(metrics.ingest_batch_size.get_sample_sum() as i64, 33);
    assert_eq!(metrics.queued_events.get(), 0, "nothing left waiting");
    let mut conn = db.conn().expect("conn");
    assert_eq!(
        possync_cloud::db::ledger::count_sales(&mut conn, Some("b1")).expect("count"),
        30
    );
}

async fn full_queue_is_refused_and_nothing_stored(kind: &str) {
    let (db, _keep) = open(kind);
    let t = terminal(&db);
    let registry = IngestRegistry::new(
        db.clone(),
        Metrics::new(),
        IngestSettings {
            queue_limit: 5,
            idle_timeout: Duration::from_secs(60),
        },
    );
    let err = registry
        .ingest("b1", batch(t, Uuid::now_v7(), 1..=6))
        .await
        .expect_err("6 events cannot fit a queue of 5");
    assert_eq!(err, IngestError::QueueFull { limit: 5 });
    let mut conn = db.conn().expect("conn");
    assert_eq!(
        possync_cloud::db::ledger::count_sales(&mut conn, None).expect("count"),
        0
    );
}

async fn idle_actor_stops_and_a_new_one_takes_over(kind: &str) {
    let (db, _keep) = open(kind);
    let t = terminal(&db);
    let pos = Uuid::now_v7();
    let metrics = Metrics::new();
    let registry = IngestRegistry::new(
        db.clone(),
        metrics.clone(),
        IngestSettings {
            queue_limit: 100,
            idle_timeout: Duration::from_millis(50),
        },
    );
    registry
        .ingest("b1", batch(t, pos, 1..=2))
        .await
        .expect("first batch");
    assert_eq!(registry.live_actors(), 1);
    // Wait (bounded) for the idle stop.
    for _ in 0..200 {
        if registry.live_actors() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(registry.live_actors(), 0, "idle actor stopped");
    assert_eq!(metrics.branch_actors.get(), 0);
    let outcomes = registry
        .ingest("b1", batch(t, pos, 2..=3))
        .await
        .expect("a new actor serves the branch");
    assert!(matches!(outcomes[0], IngestOutcome::Duplicate { .. }));
    assert!(matches!(outcomes[1], IngestOutcome::Accepted { .. }));
    assert_eq!(registry.live_actors(), 1);
}

/// One event the database refuses (`local_event_id` 0 passes no validation here and breaks the
/// ledger's CHECK on both backends), mixed into concurrent batches of four terminals of one
/// branch: it alone is answered `Refused`; every other event of every group is stored and
/// answered normally, and a full redelivery changes nothing.
async fn a_poisoned_event_is_isolated_and_its_group_committed(kind: &str) {
    let (db, _keep) = open(kind);
    let metrics = Metrics::new();
    let registry = IngestRegistry::new(db.clone(), metrics.clone(), IngestSettings::default());
    let terminals: Vec<Uuid> = (0..4).map(|_| terminal(&db)).collect();
    let pos = Uuid::now_v7();
    // Per terminal, three requests of five events; the poison sits in the middle of terminal
    // 1's second request and at the start of terminal 3's first.
    let mut requests = Vec::new();
    for (n, t) in terminals.iter().enumerate() {
        for r in 0..3i64 {
            let mut b = batch(*t, pos, r * 5 + 1..=r * 5 + 5);
            let poison_at = match (n, r) {
                (1, 1) => Some(2),
                (3, 0) => Some(0),
                _ => None,
            };
            if let Some(i) = poison_at {
                b[i].event.local_event_id = 0;
            }
            requests.push((poison_at, b));
        }
    }
    let send_all = |reqs: &Vec<(Option<usize>, Vec<possync_cloud::db::ledger::IngestRequest>)>| {
        futures::future::join_all(reqs.iter().map(|(_, b)| registry.ingest("b1", b.clone())))
    };
    let answers = send_all(&requests).await;
    let mut accepted = 0;
    for ((poison_at, _), answer) in requests.iter().zip(&answers) {
        let outcomes = answer.as_ref().expect("the group is committed, not failed");
        assert_eq!(outcomes.len(), 5);
        for (i, o) in outcomes.iter().enumerate() {
            if Some(i) == *poison_at {
                assert_eq!(*o, IngestOutcome::Refused, "the poison is refused");
            } else {
                assert!(matches!(o, IngestOutcome::Accepted { .. }), "{o:?}");
                accepted += 1;
            }
        }
    }
    assert_eq!(accepted, 4 * 15 - 2);
    assert!(
        metrics.ingest_batch_size.get_sample_count() < 12,
        "the twelve requests shared group commits"
    );
    let mut conn = db.conn().expect("conn");
    let stored = possync_cloud::db::ledger::count_sales(&mut conn, Some("b1")).expect("count");
    assert_eq!(stored, accepted);
    // Redelivering everything: duplicates for the stored, the poison refused again.
    let again = send_all(&requests).await;
    for ((poison_at, _), answer) in requests.iter().zip(&again) {
        for (i, o) in answer.as_ref().expect("committed").iter().enumerate() {
            if Some(i) == *poison_at {
                assert_eq!(*o, IngestOutcome::Refused);
            } else {
                assert!(matches!(o, IngestOutcome::Duplicate { .. }), "{o:?}");
            }
        }
    }
    let stored = possync_cloud::db::ledger::count_sales(&mut conn, Some("b1")).expect("count");
    assert_eq!(stored, accepted);
}

/// A database that refuses every row (here a trigger; in life a full disk, which diesel reports
/// like a refused value) is a storage failure: every request of the group gets the retryable
/// error and nothing is stored — never `Refused`, which a till would park.
async fn a_database_refusing_every_event_is_a_storage_failure(kind: &str) {
    use diesel::connection::SimpleConnection;
    let (db, _keep) = open(kind);
    let t = terminal(&db);
    {
        let mut conn = db.conn().expect("conn");
        match &mut *conn {
            possync_cloud::db::DbConn::Pg(c) => c.batch_execute(
                "CREATE FUNCTION refuse_all() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN RAISE EXCEPTION 'no space' USING ERRCODE = '53100'; END $$; \
                 CREATE TRIGGER refuse_all BEFORE INSERT ON sales_events \
                 FOR EACH ROW EXECUTE FUNCTION refuse_all();",
            ),
            possync_cloud::db::DbConn::Sqlite(c) => c.batch_execute(
                "CREATE TRIGGER refuse_all BEFORE INSERT ON sales_events \
                 BEGIN SELECT RAISE(ABORT, 'no space'); END;",
            ),
        }
        .expect("trigger");
    }
    let registry = IngestRegistry::new(db.clone(), Metrics::new(), IngestSettings::default());
    let pos = Uuid::now_v7();
    let answers = futures::future::join_all(
        (0..3).map(|r| registry.ingest("b1", batch(t, pos, r * 4 + 1..=r * 4 + 4))),
    )
    .await;
    for a in answers {
        assert!(matches!(a, Err(IngestError::Storage(_))), "{a:?}");
    }
    let mut conn = db.conn().expect("conn");
    let stored = possync_cloud::db::ledger::count_sales(&mut conn, None).expect("count");
    assert_eq!(stored, 0);
}

macro_rules! both {
    ($($name:ident),*) => {
        mod pg { $( #[actix_web::test] async fn $name() { super::$name("pg").await } )* }
        mod sqlite { $( #[actix_web::test] async fn $name() { super::$name("sqlite").await } )* }
    };
}

both!(
    group_commit_batches_queued_requests,
    full_queue_is_refused_and_nothing_stored,
    idle_actor_stops_and_a_new_one_takes_over,
    a_poisoned_event_is_isolated_and_its_group_committed,
    a_database_refusing_every_event_is_a_storage_failure
);

/// A refusal is final only when it repeats. PostgreSQL only: a sequence is the one state a
/// refusing trigger can keep across the rollback of its own transaction. Event 2 is refused
/// once, then stored; event 5 is refused every time for a different reason, which is the
/// database's trouble (503), not the sale's; neither is ever `Refused`.
async fn a_refusal_that_does_not_repeat_is_not_final() {
    use diesel::connection::SimpleConnection;
    let (db, _keep) = open("pg");
    let t = terminal(&db);
    {
        let mut conn = db.conn().expect("conn");
        let possync_cloud::db::DbConn::Pg(c) = &mut *conn else {
            panic!("pg")
        };
        c.batch_execute(
            "CREATE SEQUENCE once; CREATE SEQUENCE each; \
             CREATE FUNCTION flaky() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               IF NEW.local_event_id = 2 AND nextval('once') = 1 THEN \
                 RAISE EXCEPTION 'refused once'; END IF; \
               IF NEW.local_event_id = 5 THEN \
                 RAISE EXCEPTION 'refused as attempt %', nextval('each'); END IF; \
               RETURN NEW; END $$; \
             CREATE TRIGGER flaky BEFORE INSERT ON sales_events \
             FOR EACH ROW EXECUTE FUNCTION flaky();",
        )
        .expect("trigger");
    }
    let registry = IngestRegistry::new(db.clone(), Metrics::new(), IngestSettings::default());
    let pos = Uuid::now_v7();
    let once = registry.ingest("b1", batch(t, pos, 2..=2)).await;
    assert!(
        matches!(once.as_deref(), Ok([IngestOutcome::Accepted { .. }])),
        "refused once, stored on the retry: {once:?}"
    );
    let each = registry.ingest("b1", batch(t, pos, 5..=5)).await;
    assert!(
        matches!(each, Err(IngestError::Storage(_))),
        "refused differently twice is retryable: {each:?}"
    );
    let mut conn = db.conn().expect("conn");
    assert_eq!(
        possync_cloud::db::ledger::count_sales(&mut conn, None).expect("count"),
        1
    );
}

mod pg_only {
    #[actix_web::test]
    async fn a_refusal_that_does_not_repeat_is_not_final() {
        super::a_refusal_that_does_not_repeat_is_not_final().await
    }
}
