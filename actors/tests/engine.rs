//! The engine end to end against the in-memory store and the scriptable cloud: catalog
//! snapshot/delta/resnapshot, outbox outcomes, backoff, bounded concurrency, supervision and
//! restart, reconcile, shutdown. No assertion depends on how fast anything runs: tests wait
//! for conditions (with a generous overall deadline) and assert on recorded facts.

use possync_actors::backoff::BackoffPolicy;
use possync_actors::reconcile::VerifyMethod;
use possync_actors::testing::{
    entity, eventually, sale_event, world, CloudFault, Endpoint, FakeCloud, ManualClock,
    MemoryStore, StoreFault, StoreOp,
};
use possync_actors::TerminalCode;
use possync_actors::{
    ActorKind, ActorState, Clock, CloudError, DeliveryOutcome, Engine, EngineConfig, EngineError,
    LocalStore, ReconcileAction, SystemClock,
};
use possync_protocol::{ErrorCode, ReconcileMode};
use prometheus::Registry;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

fn config() -> EngineConfig {
    EngineConfig {
        snapshot_page_limit: 3,
        delta_page_limit: 2,
        delta_interval: Duration::from_millis(20),
        outbox_batch: 5,
        outbox_concurrency: 2,
        outbox_idle_poll: Duration::from_millis(10),
        backoff: BackoffPolicy {
            base: Duration::from_millis(1),
            cap: Duration::from_millis(5),
            max_attempts: 12,
        },
        reconcile_range_entries: 4,
        terminal_id: "t1".into(),
        branch_id: "b1".into(),
        rng_seed: Some(7),
        ..EngineConfig::default()
    }
}

async fn start(
    cfg: EngineConfig,
    store: &Arc<MemoryStore>,
    cloud: &Arc<FakeCloud>,
    clock: Arc<dyn Clock>,
    registry: &Registry,
) -> Engine {
    Engine::start(cfg, store.clone(), cloud.clone(), clock, registry)
        .await
        .expect("engine starts")
}

/// A cloud that is down, an engine on a manual clock with backoff `base`/`cap` seconds, and one
/// sale of `(t, p)` whose first attempt has failed.
struct Down {
    store: Arc<MemoryStore>,
    cloud: Arc<FakeCloud>,
    clock: Arc<ManualClock>,
    engine: Engine,
    t: Uuid,
    p: Uuid,
}

async fn down_with_one_failed_sale(base: u64, cap: u64) -> Down {
    let (store, cloud, _) = world();
    let clock = Arc::new(ManualClock::default());
    cloud.set_offline(true);
    let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
    store.enqueue(sale_event(t, p, 1));
    let mut cfg = config();
    cfg.backoff = BackoffPolicy {
        base: Duration::from_secs(base),
        cap: Duration::from_secs(cap),
        max_attempts: 12,
    };
    let engine = start(cfg, &store, &cloud, clock.clone(), &Registry::new()).await;
    eventually("first attempt failed", || {
        store.journal_in("failed").len() == 1
    })
    .await;
    Down {
        store,
        cloud,
        clock,
        engine,
        t,
        p,
    }
}

/// [`start`] on the system clock with a registry of its own: for tests that neither step
/// time nor read metrics.
async fn start_live(cfg: EngineConfig, store: &Arc<MemoryStore>, cloud: &Arc<FakeCloud>) -> Engine {
    start(cfg, store, cloud, Arc::new(SystemClock), &Registry::new()).await
}

fn metric(registry: &Registry, name: &str, label: Option<(&str, &str)>) -> f64 {
    for family in registry.gather() {
        if family.name() != name {
            continue;
        }
        for m in family.get_metric() {
            let matches = label.is_none_or(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == k && l.value() == v)
            });
            if matches {
                return if family.get_field_type() == prometheus::proto::MetricType::COUNTER {
                    m.get_counter().get_value()
                } else {
                    m.get_gauge().get_value()
                };
            }
        }
    }
    0.0
}

fn catalog_matches(store: &MemoryStore, cloud: &FakeCloud) -> bool {
    store.entities() == cloud.live_entities()
}

fn version(store: &MemoryStore) -> Option<i64> {
    store
        .catalog_position()
        .ok()
        .and_then(|p| p.catalog_version)
}

#[tokio::test]
async fn snapshot_over_several_pages_then_deltas_without_a_new_snapshot() {
    let (store, cloud, _) = world();
    cloud.seed_products(10);
    let registry = Registry::new();
    let engine = start(config(), &store, &cloud, Arc::new(SystemClock), &registry).await;

    eventually("snapshot complete", || version(&store) == Some(10)).await;
    assert!(catalog_matches(&store, &cloud));
    let cursors = cloud.snapshot_cursors();
    assert_eq!(cursors.len(), 4, "10 entities in pages of 3: {cursors:?}");
    assert_eq!(cursors[0], None);
    assert_eq!(metric(&registry, "snapshot_pages", None), 4.0);

    cloud.upsert("product", "p00002", serde_json::json!({"name": "renamed"}));
    cloud.delete("product", "p00003");
    cloud.upsert("product", "p00011", serde_json::json!({"name": "new"}));
    engine.sync_catalog_now().await.expect("nudge");
    eventually("delta applied", || version(&store) == Some(13)).await;
    assert!(catalog_matches(&store, &cloud));
    assert!(!store.entities().contains_key("product/p00003"));
    assert_eq!(
        cloud.snapshot_cursors().len(),
        4,
        "deltas only, no new snapshot"
    );
    assert!(metric(&registry, "delta_sync_runs", None) >= 2.0);
    eventually("idle and online", || {
        let s = engine.status();
        s.online && s.actors[&ActorKind::CatalogSyncer].state == ActorState::Idle
    })
    .await;
    engine.shutdown().await;
}

#[tokio::test]
async fn a_restart_mid_snapshot_resumes_from_the_stored_cursor() {
    let (store, cloud, _) = world();
    cloud.seed_products(10);
    // Storing the third page fails: the CatalogSyncer dies and is restarted.
    store.fail_call(StoreOp::ApplySnapshotPage, 3, StoreFault::Panic);
    let registry = Registry::new();
    let engine = start(config(), &store, &cloud, Arc::new(SystemClock), &registry).await;

    eventually("snapshot complete", || version(&store) == Some(10)).await;
    assert!(catalog_matches(&store, &cloud));
    let cursors = cloud.snapshot_cursors();
    // Pages 1, 2, 3 (lost in the store), then 3 again from the stored cursor, and 4. Page N+1
    // is fetched while page N is written, so page 4 may also have been fetched before the
    // failure: only the page in progress and the one prefetched beside it come twice.
    assert_eq!(cursors[0], None);
    let times = |c: &Option<String>| cursors.iter().filter(|x| *x == c).count();
    assert_eq!(times(&None), 1, "{cursors:?}");
    let lost = &cursors[2];
    assert_eq!(
        times(lost),
        2,
        "the page being stored is fetched again: {cursors:?}"
    );
    assert_eq!(
        times(&cursors[1]),
        1,
        "a stored page is never fetched again: {cursors:?}"
    );
    assert!(
        (5..=6).contains(&cursors.len()),
        "at most the prefetched page besides: {cursors:?}"
    );
    assert!(cursors.iter().all(|c| times(c) <= 2), "{cursors:?}");
    let status = engine.status();
    assert_eq!(status.actors[&ActorKind::CatalogSyncer].restarts, 1);
    assert!(status.actors[&ActorKind::CatalogSyncer]
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("ApplySnapshotPage")));
    assert_eq!(
        metric(
            &registry,
            "actor_restarts",
            Some(("actor", "catalog_syncer"))
        ),
        1.0
    );
    engine.shutdown().await;
}

#[tokio::test]
async fn gone_history_410_takes_a_fresh_snapshot() {
    let (store, cloud, _) = world();
    cloud.seed_products(5);
    let engine = start_live(config(), &store, &cloud).await;
    eventually("first snapshot", || version(&store) == Some(5)).await;
    let snapshots_before = cloud
        .snapshot_cursors()
        .iter()
        .filter(|c| c.is_none())
        .count();
    assert_eq!(snapshots_before, 1);

    cloud.upsert("product", "p00006", serde_json::json!({"n": 6}));
    cloud.delete("product", "p00001");
    cloud.set_horizon(6); // since=5 is now below the retained history
    engine.sync_catalog_now().await.expect("nudge");
    eventually("resnapshot complete", || version(&store) == Some(7)).await;
    let fresh = cloud
        .snapshot_cursors()
        .iter()
        .filter(|c| c.is_none())
        .count();
    assert_eq!(fresh, 2, "a second snapshot started from no cursor");
    eventually("catalog equals cloud", || catalog_matches(&store, &cloud)).await;
    engine.shutdown().await;
}

#[tokio::test]
async fn per_event_outcomes_reach_the_journal() {
    let (store, cloud, _) = world();
    let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
    let ok = sale_event(t, p, 1);
    let dup = sale_event(t, p, 2);
    let conflict = sale_event(t, p, 3);
    let mut invalid = sale_event(t, p, 4);
    invalid.payload.lines[0].total_minor = 499;
    // The cloud already holds #2 (same payload) and #3 (a different payload).
    use possync_actors::CloudApi;
    let mut other = conflict.clone();
    other.payload.receipt_no = "different".into();
    cloud
        .post_events(&[dup.clone(), other], 1)
        .await
        .expect("pre-seed");
    for ev in [ok, dup, conflict, invalid] {
        store.enqueue(ev);
    }
    let registry = Registry::new();
    let engine = start(config(), &store, &cloud, Arc::new(SystemClock), &registry).await;
    eventually("all rows settled", || {
        store
            .journal()
            .iter()
            .all(|r| r.status == "synced" || r.status == "needs_attention")
    })
    .await;
    let rows = store.journal();
    assert_eq!(rows[0].status, "synced");
    assert_eq!(rows[1].status, "synced");
    assert_eq!(rows[2].status, "needs_attention");
    assert_eq!(
        rows[2].last_error_code,
        Some(TerminalCode::Api(ErrorCode::PosSyncEventDuplicate))
    );
    assert_eq!(rows[3].status, "needs_attention");
    assert_eq!(
        rows[3].last_error_code,
        Some(TerminalCode::Api(ErrorCode::PosSyncEventInvalid))
    );
    assert!(rows[3].last_error_message.is_some());
    assert!(store.outcomes().iter().any(|o| matches!(
        o,
        DeliveryOutcome::Synced {
            duplicate: true,
            ..
        }
    )));
    // the counter moves right after the journal write, so wait for it rather than race it
    eventually("synced counter", || {
        metric(&registry, "synced_events", None) == 2.0
    })
    .await;
    eventually("queue gauge drained", || {
        metric(&registry, "queued_events", None) == 0.0
    })
    .await;
    engine.shutdown().await;
}

#[tokio::test]
async fn transient_failures_retry_and_then_deliver_exactly_once() {
    let (store, cloud, _) = world();
    cloud.fault_next(
        Endpoint::PostEvents,
        CloudFault::Fail(CloudError::Rejected {
            status: 503,
            code: Some(ErrorCode::PosSyncStorageFailed),
            message: "db down".into(),
            retry_after: None,
            reason: None,
        }),
    );
    cloud.fault_next(Endpoint::PostEvents, CloudFault::LoseAnswer);
    cloud.fault_next(Endpoint::PostEvents, CloudFault::DropLastResult);
    let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
    for i in 1..=3 {
        store.enqueue(sale_event(t, p, i));
    }
    let registry = Registry::new();
    let engine = start(config(), &store, &cloud, Arc::new(SystemClock), &registry).await;
    eventually("all synced", || store.journal_in("synced").len() == 3).await;
    let codes: Vec<TerminalCode> = store
        .outcomes()
        .into_iter()
        .filter_map(|o| match o {
            DeliveryOutcome::RetryLater { code, .. } => Some(code),
            _ => None,
        })
        .collect();
    assert!(codes.contains(&TerminalCode::STORAGE_FAILED));
    assert!(codes.contains(&TerminalCode::Network));
    assert!(codes.contains(&TerminalCode::BadResponse));
    // After the cloud's own error each sale went alone, so each met a different share of the
    // remaining faults; every failed attempt was counted as one retry.
    let attempts: u32 = store.journal().iter().map(|r| r.attempts).sum();
    assert!(store.journal().iter().all(|r| r.attempts >= 2));
    assert_eq!(cloud.stored_events(), 3, "the ledger holds each sale once");
    eventually("retry counter", || {
        metric(&registry, "outbox_retries", None) == f64::from(attempts - 3)
    })
    .await;
    engine.shutdown().await;
}

#[tokio::test]
async fn retry_after_is_honoured_before_the_next_attempt() {
    let (store, cloud, _) = world();
    let clock = Arc::new(ManualClock::default());
    cloud.fault_next(
        Endpoint::PostEvents,
        CloudFault::Fail(CloudError::Rejected {
            status: 429,
            code: Some(ErrorCode::PosSyncRateLimited),
            message: "slow down".into(),
            retry_after: Some(Duration::from_secs(30)),
            reason: None,
        }),
    );
    store.enqueue(sale_event(Uuid::now_v7(), Uuid::now_v7(), 1));
    let t0 = clock.now();
    let engine = start(config(), &store, &cloud, clock.clone(), &Registry::new()).await;
    eventually("first attempt failed", || {
        store.journal_in("failed").len() == 1
    })
    .await;
    let row = &store.journal()[0];
    let due = row.next_attempt_at.expect("retry time");
    assert!(due >= t0 + chrono::Duration::seconds(30), "{due} vs {t0}");
    assert_eq!(
        row.last_error_code,
        Some(TerminalCode::Api(ErrorCode::PosSyncRateLimited))
    );
    // While the clock stands still the row is not due, whatever the outbox polls.
    assert!(store
        .claim_batch(10, clock.now())
        .expect("claim")
        .is_empty());
    clock.advance(Duration::from_secs(31));
    engine.flush_outbox_now().await.expect("nudge");
    eventually("synced after Retry-After", || {
        store.journal_in("synced").len() == 1
    })
    .await;
    assert_eq!(cloud.calls(Endpoint::PostEvents), 2);
    engine.shutdown().await;
}

#[tokio::test]
async fn while_the_cloud_is_down_new_sales_wait_for_the_backoff_instead_of_each_failing() {
    let Down {
        store,
        cloud,
        clock,
        engine,
        t,
        p,
    } = down_with_one_failed_sale(10, 60).await;
    let calls_while_down = cloud.calls(Endpoint::PostEvents);
    for i in 2..=21 {
        store.enqueue(sale_event(t, p, i));
        engine.flush_outbox_now().await.expect("nudge");
    }
    eventually("outbox reports the hold", || {
        matches!(
            engine.status().actors[&ActorKind::SalesOutbox].state,
            ActorState::Holding { .. }
        )
    })
    .await;
    // The clock stands still inside the backoff: the nudges claim nothing and send nothing.
    assert_eq!(cloud.calls(Endpoint::PostEvents), calls_while_down);
    assert_eq!(store.journal_in("pending").len(), 20);

    cloud.set_offline(false);
    clock.advance(Duration::from_secs(61));
    engine.flush_outbox_now().await.expect("nudge");
    eventually("all delivered", || store.journal_in("synced").len() == 21).await;
    assert_eq!(cloud.stored_events(), 21);
    engine.shutdown().await;
}

#[tokio::test]
async fn a_proxy_error_page_holds_the_queue_and_parks_nothing() {
    // nginx / a WAF / a CDN answers for the cloud: a 403 page, then a 404 mid-deploy, then a
    // 413 — none with the cloud's envelope. None of them is the cloud refusing the sales.
    let (store, cloud, _) = world();
    for (status, page) in [
        (403, "<html><body><h1>403 Forbidden</h1>nginx</body></html>"),
        (404, "<html>404 Not Found</html>"),
        (413, "<html>413 Request Entity Too Large</html>"),
    ] {
        cloud.fault_next(
            Endpoint::PostEvents,
            CloudFault::Fail(CloudError::Rejected {
                status,
                code: None,
                message: page.into(),
                retry_after: None,
                reason: None,
            }),
        );
    }
    let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
    for i in 1..=4 {
        store.enqueue(sale_event(t, p, i));
    }
    let engine = start_live(config(), &store, &cloud).await;
    eventually("all synced once the proxy lets them through", || {
        store.journal_in("synced").len() == 4
    })
    .await;
    assert!(store.journal_in("needs_attention").is_empty());
    let codes: Vec<TerminalCode> = store
        .outcomes()
        .into_iter()
        .map(|o| match o {
            DeliveryOutcome::RetryLater { code, .. } => code,
            DeliveryOutcome::NeedsAttention { code, .. } => panic!("parked with {code}"),
            DeliveryOutcome::Synced { .. } => TerminalCode::Network,
        })
        .collect();
    for status in [403, 404, 413] {
        assert!(codes.contains(&TerminalCode::Http(status)), "{codes:?}");
    }
    assert_eq!(cloud.stored_events(), 4);
    engine.shutdown().await;
}

#[tokio::test]
async fn a_proxy_body_limit_below_the_batch_is_found_by_halving_and_every_sale_goes_through() {
    // nginx in front of the cloud with a body limit of 24 KiB, and a queue whose claimed batch
    // is three times that: the first requests meet the proxy's 413 page; the outbox halves its
    // requests until they pass, and parks nothing.
    let (store, cloud, _) = world();
    let limit = 24 * 1024;
    cloud.set_proxy_body_limit(limit);
    let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
    let one = serde_json::to_vec(&sale_event(t, p, 1))
        .expect("json")
        .len()
        + 1;
    let n = (3 * limit).div_ceil(one);
    for i in 1..=n {
        store.enqueue(sale_event(t, p, i64::try_from(i).expect("small")));
    }
    let mut cfg = config();
    cfg.outbox_batch = n;
    cfg.outbox_concurrency = 1;
    let engine = start_live(cfg, &store, &cloud).await;
    eventually("every sale through the proxy", || {
        store.journal_in("synced").len() == n
    })
    .await;
    assert!(store.journal_in("needs_attention").is_empty());
    assert_eq!(cloud.stored_events(), n);
    let sizes = cloud.post_batch_sizes();
    assert_eq!(
        sizes.first(),
        Some(&n),
        "the first request carried the whole batch"
    );
    assert!(
        sizes.iter().any(|s| s * one <= limit),
        "later requests fit the proxy: {sizes:?}"
    );
    engine.shutdown().await;
}

#[tokio::test]
async fn a_wall_clock_stepped_back_by_hours_does_not_stall_delivery() {
    // The till booted with a wrong RTC; the cloud was away; then NTP steps the clock back 3 h.
    // The outbox's hold must keep probing at its pace (monotonic time), and the stored retry
    // time, now 3 h ahead of the wall clock, must not keep the sale waiting 3 h.
    let Down {
        store,
        cloud,
        clock,
        engine,
        ..
    } = down_with_one_failed_sale(10, 60).await;
    eventually("outbox holds", || {
        matches!(
            engine.status().actors[&ActorKind::SalesOutbox].state,
            ActorState::Holding { .. }
        )
    })
    .await;
    let probes = cloud.calls(Endpoint::Probe);
    clock.step_wall(-3 * 3600);
    clock.advance(Duration::from_secs(61));
    eventually("the hold still probes on time", || {
        cloud.calls(Endpoint::Probe) > probes
    })
    .await;
    // The cloud is back; the sale's stored retry time is ~3 h ahead of the wall clock.
    cloud.set_offline(false);
    clock.advance(Duration::from_secs(61));
    engine.flush_outbox_now().await.expect("nudge");
    eventually("delivered without waiting out the step", || {
        store.journal_in("synced").len() == 1
    })
    .await;
    assert_eq!(cloud.stored_events(), 1);
    engine.shutdown().await;
}

#[tokio::test]
async fn an_answer_from_the_cloud_lifts_the_outbox_hold_early() {
    let Down {
        store,
        cloud,
        clock,
        engine,
        t,
        p,
    } = down_with_one_failed_sale(3600, 3600).await;
    cloud.seed_products(2);
    for i in 2..=4 {
        store.enqueue(sale_event(t, p, i));
    }
    // The cloud returns; a catalog call gets an answer well inside the outbox's hold.
    cloud.set_offline(false);
    clock.advance(Duration::from_secs(1));
    engine.sync_catalog_now().await.expect("nudge catalog");
    eventually("catalog synced", || version(&store) == Some(2)).await;
    engine.flush_outbox_now().await.expect("nudge outbox");
    eventually("queued sales delivered", || {
        store.journal_in("synced").len() == 3
    })
    .await;
    engine.shutdown().await;
}

#[tokio::test]
async fn an_outage_longer_than_the_attempt_budget_never_needs_an_operator() {
    let (store, cloud, _) = world();
    cloud.set_offline(true);
    let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
    store.enqueue(sale_event(t, p, 1));
    let mut cfg = config();
    cfg.backoff.max_attempts = 3;
    let engine = start_live(cfg, &store, &cloud).await;
    // Many times the budget of 3 attempts: the outbox probes, sends no sale, parks nothing.
    eventually("probed well past the budget", || {
        cloud.calls(Endpoint::Probe) >= 12
    })
    .await;
    for i in 2..=10 {
        store.enqueue(sale_event(t, p, i));
    }
    assert_eq!(
        cloud.calls(Endpoint::PostEvents),
        1,
        "one doomed batch, then probes only"
    );
    assert!(store.journal_in("needs_attention").is_empty());
    eventually("offline shown", || {
        let s = engine.status();
        !s.online && s.offline_since.is_some()
    })
    .await;

    cloud.set_offline(false);
    eventually("every sale delivered by itself", || {
        store.journal_in("synced").len() == 10
    })
    .await;
    assert_eq!(cloud.stored_events(), 10);
    assert!(store.journal_in("needs_attention").is_empty());
    eventually("online shown", || {
        let s = engine.status();
        s.online && s.offline_since.is_none()
    })
    .await;
    engine.shutdown().await;
}

#[tokio::test]
async fn a_sale_the_cloud_keeps_failing_while_storing_others_needs_attention_alone() {
    let (store, cloud, _) = world();
    let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
    cloud.poison(1);
    store.enqueue(sale_event(t, p, 1));
    let mut cfg = config();
    cfg.backoff.max_attempts = 3;
    cfg.outbox_concurrency = 1;
    let engine = start_live(cfg, &store, &cloud).await;
    // Other sales keep coming and are stored: the evidence that the failure is sale 1's own.
    let mut next = 2;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while store.journal_in("needs_attention").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "sale 1 never parked: {:?}",
            store.journal()[0]
        );
        store.enqueue(sale_event(t, p, next));
        next += 1;
        engine.flush_outbox_now().await.expect("nudge");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let parked = store.journal_in("needs_attention");
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].event.local_event_id, 1);
    assert_eq!(
        parked[0].last_error_code,
        Some(TerminalCode::AttemptsExhausted)
    );
    assert_eq!(
        parked[0].history.sale_failures, 2,
        "the third blamed failure gave up"
    );
    eventually("the others all delivered", || {
        store.journal_in("synced").len() == (next - 2) as usize
    })
    .await;

    cloud.cure(1);
    assert_eq!(store.retry_all_needing_attention(), 1);
    engine.flush_outbox_now().await.expect("nudge");
    eventually("synced after operator retry", || {
        store.journal_in("synced").len() == (next - 1) as usize
    })
    .await;
    engine.shutdown().await;
}

#[tokio::test]
async fn outbox_concurrency_never_exceeds_the_limit() {
    for limit in [1usize, 2, 3] {
        let store = Arc::new(MemoryStore::new());
        let cloud = Arc::new(FakeCloud::new().with_post_delay(Duration::from_millis(2)));
        let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
        for i in 1..=24 {
            store.enqueue(sale_event(t, p, i));
        }
        let mut cfg = config();
        cfg.outbox_batch = 2;
        cfg.outbox_concurrency = limit;
        // Hold the cloud's answers: the outbox fills every slot and no more.
        cloud.close_gate();
        let engine = start_live(cfg, &store, &cloud).await;
        eventually("every slot in use", || cloud.concurrent_posts() == limit).await;
        engine.flush_outbox_now().await.expect("nudge");
        // a nudge while full claims nothing more
        eventually("nudge handled", || {
            matches!(
                engine.status().actors[&ActorKind::SalesOutbox].state,
                ActorState::Sending { .. }
            )
        })
        .await;
        assert_eq!(store.journal_in("in_flight").len(), 2 * limit);
        cloud.open_gate();
        eventually("all synced", || store.journal_in("synced").len() == 24).await;
        assert_eq!(cloud.max_concurrent_posts(), limit);
        assert!(cloud.post_batch_sizes().iter().all(|n| *n <= 2));
        assert_eq!(cloud.stored_events(), 24);
        engine.shutdown().await;
    }
}

#[tokio::test]
async fn a_failed_child_is_restarted_and_its_work_resumes() {
    let (store, cloud, _) = world();
    let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
    store.enqueue(sale_event(t, p, 1));
    // The outbox's first claim panics inside the store (a bug, a corrupt page …).
    store.fail_call(StoreOp::ClaimBatch, 1, StoreFault::Panic);
    let registry = Registry::new();
    let engine = start(config(), &store, &cloud, Arc::new(SystemClock), &registry).await;
    eventually("restarted once", || {
        engine.status().actors[&ActorKind::SalesOutbox].restarts == 1
    })
    .await;
    eventually("first sale synced", || {
        store.journal_in("synced").len() == 1
    })
    .await;
    store.enqueue(sale_event(t, p, 2));
    engine.flush_outbox_now().await.expect("nudge");
    eventually("second sale synced", || {
        store.journal_in("synced").len() == 2
    })
    .await;
    assert_eq!(
        metric(&registry, "actor_restarts", Some(("actor", "sales_outbox"))),
        1.0
    );
    let status = engine.status();
    assert_eq!(status.actors[&ActorKind::CatalogSyncer].restarts, 0);
    let json = serde_json::to_value(&status).expect("status serializes");
    assert_eq!(json["actors"]["sales_outbox"]["restarts"], 1);
    engine.shutdown().await;
}

#[tokio::test]
async fn an_actor_that_keeps_failing_is_restarted_ever_more_slowly_and_comes_back() {
    // A persistent fault (a full disk): the outbox's claim fails 12 times in a row. It used
    // to be left down for good after 10 restarts in 60 s; now it waits ever longer between
    // restarts, shows why, and comes back by itself once the fault clears.
    let (store, cloud, _) = world();
    cloud.seed_products(2);
    let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
    store.enqueue(sale_event(t, p, 1));
    store.fail_next(StoreOp::ClaimBatch, 12, StoreFault::Error);
    let mut cfg = config();
    cfg.restart_delay_base = Duration::from_millis(2);
    cfg.restart_delay_cap = Duration::from_millis(40);
    let clock = Arc::new(SystemClock);
    let engine = start(cfg, &store, &cloud, clock, &Registry::new()).await;
    // The run of failures is visible while it lasts: the count grows past the old limit.
    eventually("restarting, visibly, after many failures", || {
        let s = &engine.status().actors[&ActorKind::SalesOutbox];
        matches!(s.state, ActorState::Restarting { failures, .. } if failures >= 11)
            && s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("injected"))
    })
    .await;
    // the rest of the engine keeps working meanwhile
    eventually("catalog synced", || version(&store) == Some(2)).await;
    eventually("the outbox is back and delivers", || {
        store.journal_in("synced").len() == 1
    })
    .await;
    let outbox = engine.status().actors[&ActorKind::SalesOutbox].clone();
    assert_eq!(
        outbox.restarts, 12,
        "one restart per failure, none given up"
    );
    assert!(!matches!(outbox.state, ActorState::Restarting { .. }));
    store.enqueue(sale_event(t, p, 2));
    engine.flush_outbox_now().await.expect("running again");
    eventually("second sale synced", || {
        store.journal_in("synced").len() == 2
    })
    .await;
    engine.shutdown().await;
}

async fn synced_catalog(n: usize) -> (Arc<MemoryStore>, Arc<FakeCloud>, Engine) {
    let (store, cloud, _) = world();
    cloud.seed_products(n);
    let engine = start_live(config(), &store, &cloud).await;
    eventually("snapshot complete", || version(&store) == Some(n as i64)).await;
    (store, cloud, engine)
}

#[tokio::test]
async fn verify_reports_drift_and_changes_nothing_then_apply_repairs_it() {
    let (store, cloud, engine) = synced_catalog(10).await;
    // A cloud from before the fingerprint routes: the manifest walk, range by range.
    cloud.act_as_old_cloud(true);
    // local tampering: one changed, one missing, one that the cloud never had
    store.tamper_put(entity(
        "product",
        "p00002",
        2,
        serde_json::json!({"name": "tampered"}),
    ));
    store.tamper_remove("product/p00005");
    store.tamper_put(entity("product", "zzz", 1, serde_json::json!({})));
    let before = store.entities();

    let report = engine
        .reconcile(ReconcileAction::Verify)
        .await
        .expect("verify");
    assert_eq!(report.method, VerifyMethod::Manifest);
    assert_eq!(report.upserts, 2, "{report:?}");
    assert_eq!(report.deletes, 1);
    assert_eq!(report.checked, 10);
    assert_eq!(
        report.round_trips,
        cloud.reconcile_requests().len() as u64 + 1,
        "every range, plus the refused fingerprint request"
    );
    assert!(!report.applied);
    assert_eq!(report.catalog_version, Some(10));
    assert_eq!(store.entities(), before, "verify changed nothing");

    let requests = cloud.reconcile_requests();
    assert!(requests
        .iter()
        .all(|(m, _, n)| *m == ReconcileMode::Verify && *n <= 4));
    // consecutive ranges covering the whole key space
    assert_eq!(requests[0].1.after, None);
    assert_eq!(requests.last().map(|r| r.1.through.clone()), Some(None));
    for w in requests.windows(2) {
        assert_eq!(w[1].1.after, w[0].1.through);
    }

    let applied = engine
        .reconcile(ReconcileAction::Apply)
        .await
        .expect("apply");
    assert!(applied.applied);
    assert_eq!((applied.upserts, applied.deletes), (2, 1));
    assert!(catalog_matches(&store, &cloud));
    let again = engine
        .reconcile(ReconcileAction::Verify)
        .await
        .expect("verify");
    assert_eq!((again.upserts, again.deletes, again.unchanged), (0, 0, 10));
    engine.shutdown().await;
}

#[tokio::test]
async fn manifest_too_large_shrinks_the_range() {
    let store = Arc::new(MemoryStore::new());
    let cloud = Arc::new(FakeCloud::new().with_max_manifest_entries(3));
    cloud.act_as_old_cloud(true);
    cloud.seed_products(10);
    let mut cfg = config();
    cfg.reconcile_range_entries = 8;
    let engine = start_live(cfg, &store, &cloud).await;
    eventually("snapshot complete", || version(&store) == Some(10)).await;
    store.tamper_remove("product/p00007");
    let report = engine
        .reconcile(ReconcileAction::Apply)
        .await
        .expect("apply");
    assert_eq!(report.checked, 9);
    assert_eq!(report.upserts, 1);
    let requests = cloud.reconcile_requests();
    assert_eq!(requests[0].2, 8, "first try at the configured size");
    assert!(
        requests.iter().any(|r| r.2 == 2),
        "shrunk to fit: {requests:?}"
    );
    assert!(catalog_matches(&store, &cloud));
    engine.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_and_joins_every_actor() {
    let (store, cloud, engine) = synced_catalog(4).await;
    store.enqueue(sale_event(Uuid::now_v7(), Uuid::now_v7(), 1));
    engine.flush_outbox_now().await.expect("nudge");
    eventually("synced", || store.journal_in("synced").len() == 1).await;
    engine.shutdown().await;
    // Every actor dropped its state (and with it the store and cloud handles).
    eventually("store released", || Arc::strong_count(&store) == 1).await;
    eventually("cloud released", || Arc::strong_count(&cloud) == 1).await;
    let calls = cloud.calls(Endpoint::Delta);
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(
        cloud.calls(Endpoint::Delta),
        calls,
        "no actor polls after shutdown"
    );
}

#[tokio::test]
async fn metrics_are_registered_in_the_given_registry() {
    let (store, cloud, _) = world();
    let registry = Registry::new();
    let engine = start(config(), &store, &cloud, Arc::new(SystemClock), &registry).await;
    // labelled vectors only appear once used; the plain ones are there from the start
    let names: Vec<String> = registry
        .gather()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    for n in [
        "queued_events",
        "synced_events",
        "delta_sync_runs",
        "reconcile_runs",
        "snapshot_pages",
        "outbox_retries",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    // a second engine on the same registry is refused, not silently unmetered
    let second = Engine::start(
        config(),
        store.clone(),
        cloud.clone(),
        Arc::new(SystemClock),
        &registry,
    )
    .await;
    assert!(matches!(second, Err(EngineError::Metrics(_))));
    engine.shutdown().await;
}

#[tokio::test]
async fn outbox_failing_after_the_cloud_stored_resends_and_the_ledger_keeps_one_copy() {
    let (store, cloud, _) = world();
    let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
    for i in 1..=7 {
        store.enqueue(sale_event(t, p, i));
    }
    // The cloud commits the first batch, then recording its outcomes fails: the outbox dies
    // with rows still in flight, and its restart must release and resend them.
    store.fail_call(StoreOp::RecordOutcomes, 1, StoreFault::Error);
    let engine = start_live(config(), &store, &cloud).await;
    eventually("all synced", || store.journal_in("synced").len() == 7).await;
    assert_eq!(cloud.stored_events(), 7, "each sale stored once");
    assert_eq!(engine.status().actors[&ActorKind::SalesOutbox].restarts, 1);
    assert!(
        store.outcomes().iter().any(|o| matches!(
            o,
            DeliveryOutcome::Synced {
                duplicate: true,
                ..
            }
        )),
        "the resent sales came back as duplicates"
    );
    assert_eq!(store.synced_rewrites(), 0);
    engine.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_cloud_shows_offline_and_the_catalog_catches_up_when_it_returns() {
    let (store, cloud, _) = world();
    cloud.seed_products(4);
    cloud.set_offline(true);
    let engine = start_live(config(), &store, &cloud).await;
    eventually("offline shown", || {
        let s = engine.status();
        !s.online
            && matches!(
                s.actors[&ActorKind::CatalogSyncer].state,
                ActorState::Offline { .. }
            )
            && cloud.calls(Endpoint::Snapshot) >= 2
    })
    .await;
    assert_eq!(
        engine.status().actors[&ActorKind::CatalogSyncer].restarts,
        0
    );
    cloud.set_offline(false);
    eventually("snapshot complete", || version(&store) == Some(4)).await;
    eventually("online again", || engine.status().online).await;
    assert!(engine.status().last_contact_at.is_some());
    engine.shutdown().await;
}

#[tokio::test]
async fn shutdown_mid_flush_leaves_rows_in_flight_and_the_next_start_delivers_them() {
    let (store, cloud, _) = world();
    let (t, p) = (Uuid::now_v7(), Uuid::now_v7());
    for i in 1..=3 {
        store.enqueue(sale_event(t, p, i));
    }
    cloud.close_gate();
    let engine = start_live(config(), &store, &cloud).await;
    eventually("a post is open", || cloud.concurrent_posts() == 1).await;
    engine.shutdown().await;
    // the held call was abandoned with the actor: no task keeps the cloud or store alive
    eventually("cloud released", || Arc::strong_count(&cloud) == 1).await;
    eventually("store released", || Arc::strong_count(&store) == 1).await;
    assert_eq!(store.journal_in("in_flight").len(), 3);

    cloud.open_gate();
    let engine = start_live(config(), &store, &cloud).await;
    eventually("delivered after restart", || {
        store.journal_in("synced").len() == 3
    })
    .await;
    assert_eq!(cloud.stored_events(), 3);
    engine.shutdown().await;
}

#[tokio::test]
async fn fingerprint_verify_finds_each_kind_of_tampering_in_a_few_round_trips() {
    let (store, cloud, engine) = synced_catalog(300).await;
    let clean = engine
        .reconcile(ReconcileAction::Verify)
        .await
        .expect("verify");
    assert_eq!(clean.method, VerifyMethod::Fingerprints);
    assert_eq!((clean.upserts, clean.deletes, clean.unchanged), (0, 0, 300));
    assert_eq!(
        clean.round_trips, 1,
        "no drift: one request of 16 fingerprints"
    );
    assert!(clean.bytes_sent > 0 && clean.bytes_received > 0);
    assert_eq!(cloud.calls(Endpoint::Reconcile), 0, "no manifest sent");

    // an edited row, a deleted row, an extra row, a row with a forged newer version
    store.tamper_put(entity(
        "product",
        "p00002",
        2,
        serde_json::json!({"name": "tampered"}),
    ));
    store.tamper_remove("product/p00005");
    store.tamper_put(entity("product", "zzz", 1, serde_json::json!({})));
    let mut forged = store.entities()["product/p00009"].clone();
    forged.version += 1000;
    store.tamper_put(forged);
    let before = store.entities();
    let report = engine
        .reconcile(ReconcileAction::Verify)
        .await
        .expect("verify");
    assert_eq!(report.method, VerifyMethod::Fingerprints);
    assert_eq!((report.upserts, report.deletes), (3, 1), "{report:?}");
    assert!(report.round_trips <= 6, "{report:?}");
    assert_eq!(store.entities(), before, "verify changed nothing");
    assert_eq!(cloud.calls(Endpoint::Reconcile), 0);

    let applied = engine
        .reconcile(ReconcileAction::Apply)
        .await
        .expect("apply");
    assert!(applied.applied);
    assert_eq!((applied.upserts, applied.deletes), (3, 1));
    assert!(catalog_matches(&store, &cloud));
    let again = engine
        .reconcile(ReconcileAction::Verify)
        .await
        .expect("verify");
    assert_eq!((again.upserts, again.deletes, again.unchanged), (0, 0, 300));
    assert_eq!(again.round_trips, 1);
    engine.shutdown().await;
}

#[tokio::test]
async fn the_scheduled_verify_runs_by_itself_and_reports_drift_on_status_and_metrics() {
    let store = Arc::new(MemoryStore::new());
    let cloud = Arc::new(FakeCloud::new());
    cloud.seed_products(20);
    let mut cfg = config();
    cfg.verify_every = Some(Duration::from_millis(200));
    let registry = Registry::new();
    let engine = start(cfg, &store, &cloud, Arc::new(SystemClock), &registry).await;
    eventually("snapshot complete", || version(&store) == Some(20)).await;
    store.tamper_remove("product/p00003");
    eventually("a scheduled verify saw the drift", || {
        engine
            .status()
            .last_verify
            .is_some_and(|v| v.scheduled && v.drift_entities == Some(1) && v.round_trips > 0)
    })
    .await;
    assert_eq!(metric(&registry, "catalog_drift_entities", None), 1.0);
    assert!(metric(&registry, "reconcile_bytes_total", None) > 0.0);
    // verify never repairs: the entity is still missing
    assert!(!store.entities().contains_key("product/p00003"));
    engine.shutdown().await;
}
