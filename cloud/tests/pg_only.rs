//! Behaviour that only PostgreSQL can show: two `cloud serve` processes sharing one database,
//! and the database disappearing under a running server.

mod common;

use common::{expect_error, json_ok, Backend, Env, NO_LIMITS};
use possync_testkit::cloud::CloudProcess;
use possync_testkit::{events_body, sample_sale_event};
use serde_json::Value;
use std::collections::HashMap;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_database_store_each_sale_exactly_once() {
    let env = Env::start(Backend::Pg);
    let url = env.pg.as_ref().expect("pg").url.clone();
    let second = CloudProcess::start_with(Some(&url), NO_LIMITS).expect("second cloud");
    let (tid, token) = env.terminal("b1");
    let pos = Uuid::now_v7();
    let events: Vec<_> = (1..=60)
        .map(|i| sample_sale_event(tid, pos, i, "b1"))
        .collect();

    // Both processes get every event, in overlapping batches of 20, all at once.
    let mut tasks = Vec::new();
    for base in [env.url(""), second.url("")] {
        for chunk in events.chunks(20) {
            let client = reqwest::Client::new();
            let body = events_body(chunk);
            let (base, token) = (base.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                let r = client
                    .post(format!("{base}/v1/pos/sales/events"))
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .expect("sent");
                json_ok(r).await
            }));
        }
    }
    let mut per_event: HashMap<i64, Vec<(String, String)>> = HashMap::new();
    for t in tasks {
        let v: Value = t.await.expect("task");
        for r in v["results"].as_array().expect("results") {
            per_event
                .entry(r["local_event_id"].as_i64().expect("id"))
                .or_default()
                .push((
                    r["status"].as_str().unwrap_or("").to_string(),
                    r["cloud_event_id"].to_string(),
                ));
        }
    }
    assert_eq!(per_event.len(), 60);
    for (id, answers) in &per_event {
        assert_eq!(answers.len(), 2, "event {id} answered by both processes");
        let accepted = answers.iter().filter(|(s, _)| s == "accepted").count();
        let duplicate = answers.iter().filter(|(s, _)| s == "duplicate").count();
        assert_eq!((accepted, duplicate), (1, 1), "event {id}: {answers:?}");
        assert_eq!(answers[0].1, answers[1].1, "both name the one stored event");
    }
    assert_eq!(env.sales_count().await, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_gone_answers_503_storage_failed_and_readyz_fails() {
    let env = Env::start(Backend::Pg);
    let (tid, token) = env.terminal("b1");
    json_ok(env.get("/readyz", None).await).await;
    let ok = sample_sale_event(tid, Uuid::now_v7(), 1, "b1");
    json_ok(
        env.post_json("/v1/pos/sales/events", Some(&token), &events_body(&[ok]))
            .await,
    )
    .await;

    // Drop the database under the running server.
    let pg = env.pg.as_ref().expect("pg");
    pg.drop_now().expect("drop database");

    expect_error(
        env.get("/readyz", None).await,
        503,
        "POS_SYNC_STORAGE_FAILED",
    )
    .await;
    // Authentication itself needs the database: the terminal is told to retry, not that its
    // token is bad.
    let e = sample_sale_event(tid, Uuid::now_v7(), 2, "b1");
    let v = expect_error(
        env.post_json("/v1/pos/sales/events", Some(&token), &events_body(&[e]))
            .await,
        503,
        "POS_SYNC_STORAGE_FAILED",
    )
    .await;
    assert_eq!(v["error"]["retryable"], true);
    let msg = v["error"]["message"]
        .as_str()
        .expect("the envelope has a message");
    assert!(
        !msg.is_empty() && !msg.contains(pg.name()),
        "no internals leak: {msg}"
    );
}

/// Issue 7 §2, through real `cloud serve`: a sale that passes validation but that the database
/// refuses (here a trigger raising a data exception, SQLSTATE 22000, standing for any value
/// PostgreSQL cannot hold) is sent by one terminal while three others of the same branch sync
/// concurrently. Only that event is `rejected` with `POS_SYNC_EVENT_INVALID`; every other event
/// of every request — including the poisoned request — is stored and answered `accepted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_is_rejected_alone_while_its_branch_syncs() {
    use diesel::RunQueryDsl;
    let env = Env::start(Backend::Pg);
    let url = env.pg.as_ref().expect("pg").url.clone();
    let db = possync_cloud::db::Database::connect(&url, 1).expect("connect");
    let mut conn = db.conn().expect("conn");
    let possync_cloud::db::DbConn::Pg(pg) = &mut *conn else {
        panic!("a PostgreSQL connection");
    };
    diesel::sql_query(
        "CREATE FUNCTION poison_refused() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.receipt_no LIKE 'POISON%' THEN \
           RAISE EXCEPTION 'cannot store %', NEW.receipt_no USING ERRCODE = '22000'; \
         END IF; RETURN NEW; END $$",
    )
    .execute(pg)
    .expect("function");
    diesel::sql_query(
        "CREATE TRIGGER poison_refused BEFORE INSERT ON sales_events \
         FOR EACH ROW EXECUTE FUNCTION poison_refused()",
    )
    .execute(pg)
    .expect("trigger");
    drop(conn);

    let terminals: Vec<(Uuid, String)> = (0..4).map(|_| env.terminal("b1")).collect();
    let mut tasks = Vec::new();
    for (n, (tid, token)) in terminals.iter().enumerate() {
        let pos = Uuid::now_v7();
        for r in 0..3i64 {
            let mut events: Vec<_> = (r * 10 + 1..=r * 10 + 10)
                .map(|i| sample_sale_event(*tid, pos, i, "b1"))
                .collect();
            let poisoned = n == 2 && r == 1;
            if poisoned {
                events[4].payload.receipt_no = "POISON-1".into();
            }
            let body = events_body(&events);
            let (url, token, client) = (
                env.url("/v1/pos/sales/events"),
                token.clone(),
                env.http.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let r = client
                    .post(url)
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .expect("sent");
                (poisoned, json_ok(r).await)
            }));
        }
    }
    let mut accepted = 0;
    for t in tasks {
        let (poisoned, v) = t.await.expect("joined");
        for (i, r) in v["results"].as_array().expect("results").iter().enumerate() {
            if poisoned && i == 4 {
                assert_eq!(r["status"], "rejected", "{v}");
                assert_eq!(r["code"], "POS_SYNC_EVENT_INVALID", "{v}");
                assert_eq!(r["local_event_id"], 15, "{v}");
            } else {
                assert_eq!(r["status"], "accepted", "{v}");
                accepted += 1;
            }
        }
    }
    assert_eq!(accepted, 4 * 30 - 1);
    assert_eq!(env.sales_count().await, accepted);
    // The refusal is the client's event, not the server's fault: no ERROR line.
    let log = std::fs::read_to_string(env.cloud.log_path()).unwrap_or_default();
    assert!(!log.contains("\"level\":\"ERROR\""), "{log}");
    assert!(log.contains("the database refused one event"), "{log}");
}

/// A metric's value in `/metrics` text (0 when absent).
async fn metric(cloud: &CloudProcess, name: &str) -> f64 {
    let text = reqwest::get(cloud.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    possync_testkit::metrics_text::sample(&text, name).unwrap_or(0.0)
}

/// Polls `cloud` until `metric == want` (listener state changes asynchronously).
async fn wait_metric(cloud: &CloudProcess, name: &str, want: f64) {
    for _ in 0..200 {
        if metric(cloud, name).await == want {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{name} never became {want} on {}", cloud.base_url);
}

async fn delta(cloud: &CloudProcess, token: &str, since: i64) -> Value {
    let r = reqwest::Client::new()
        .get(cloud.url(&format!("/v1/pos/catalog/delta?since={since}")))
        .bearer_auth(token)
        .send()
        .await
        .expect("delta sent");
    json_ok(r).await
}

/// Polls `cloud` for `branch`'s delta from `since` until it carries a change (bounded by the
/// notification latency plus the listener's poll interval; 10 s here only so a broken
/// listener fails the test instead of hanging it).
async fn delta_until_changed(cloud: &CloudProcess, token: &str, since: i64) -> Value {
    for _ in 0..200 {
        let page = delta(cloud, token, since).await;
        if !page["changes"].as_array().expect("changes").is_empty() {
            return page;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "a change written through the other instance never reached {}",
        cloud.base_url
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_delta_poll_is_answered_from_memory_and_a_change_through_another_instance_reaches_it(
) {
    let env = Env::start(Backend::Pg);
    let pg = env.pg.as_ref().expect("pg");
    let args: Vec<&str> = NO_LIMITS
        .iter()
        .copied()
        .chain(["--delta-from-memory"])
        .collect();
    let b = CloudProcess::start_with(Some(&pg.url), &args).expect("second cloud");
    let (_, north) = env.terminal("north");
    let (_, south) = env.terminal("south");
    let upsert = |id: &str, branch: &str| serde_json::json!([{"type": "product", "id": id, "branch_id": branch, "data": {"name": id}}]);
    env.admin_upsert(upsert("n1", "north")).await;
    wait_metric(&b, "catalog_listener_connected", 1.0).await;

    // Once B has taken in n1 (until then it answers as of version 0: the documented bound),
    // a caught-up poll is answered from memory (no query).
    let first = delta_until_changed(&b, &north, 0).await;
    let v1 = newest_version(&first);
    let page = until_from_memory(&b, &north, v1).await;
    assert!(page["catalog_version"].as_i64() >= Some(v1), "{page}");

    // A change for north written through A reaches north's poll on B ...
    env.admin_upsert(upsert("n2", "north")).await;
    let page = delta_until_changed(&b, &north, v1).await;
    assert_eq!(page["changes"][0]["id"], "n2", "since {v1}: {page}");
    let v2 = newest_version(&page);
    assert!(v2 > v1);
    // ... while south, which sees nothing of it, moves past it from memory.
    let page = until_from_memory(&b, &south, v1).await;
    assert!(page["catalog_version"].as_i64() >= Some(v2), "{page}");

    // The listener's connection is cut: B forgets, reconnects, reloads, and still never
    // hides a change written meanwhile.
    pg.batch_execute(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = '{}' AND datname = current_database()",
        possync_cloud::catalog_versions::LISTENER_APPLICATION_NAME
    ))
    .expect("terminate the listeners");
    env.admin_upsert(upsert("n3", "north")).await;
    let page = delta_until_changed(&b, &north, v2).await;
    assert_eq!(page["changes"][0]["id"], "n3");
    let v3 = newest_version(&page);
    // Back on: once B has reloaded (or taken in n3's notification), a caught-up poll is
    // answered from memory again — and never hides anything.
    wait_metric(&b, "catalog_listener_connected", 1.0).await;
    until_from_memory(&b, &north, v3).await;
}

/// The highest entity version in a delta page.
fn newest_version(page: &Value) -> i64 {
    page["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .filter_map(|c| c["version"].as_i64())
        .max()
        .expect("a change")
}

/// Polls `since` until `cloud` answers it from memory (its counter moves); every answer on
/// the way must be empty — a caught-up terminal is never shown a change it already has.
async fn until_from_memory(cloud: &CloudProcess, token: &str, since: i64) -> Value {
    for _ in 0..200 {
        let before = metric(cloud, "delta_polls_from_memory").await;
        let page = delta(cloud, token, since).await;
        assert_eq!(
            page["changes"],
            serde_json::json!([]),
            "since {since}: {page}"
        );
        if metric(cloud, "delta_polls_from_memory").await > before {
            return page;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "{} never answered since={since} from memory",
        cloud.base_url
    );
}

/// GETs one snapshot page (zstd, as a till asks) and returns its cursor for the next one.
async fn snapshot_page(cloud: &CloudProcess, token: &str, cursor: Option<&str>) -> Option<String> {
    let mut url = cloud.url("/v1/pos/catalog/snapshot?limit=2");
    if let Some(c) = cursor {
        url.push_str(&format!("&cursor={c}"));
    }
    let resp = reqwest::Client::builder()
        .no_zstd()
        .build()
        .expect("client")
        .get(url)
        .bearer_auth(token)
        .header("accept-encoding", "zstd")
        .send()
        .await
        .expect("snapshot");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-encoding"], "zstd");
    let body = resp.bytes().await.expect("body");
    let page: Value = serde_json::from_slice(&zstd::stream::decode_all(&body[..]).expect("zstd"))
        .expect("page json");
    page["next_cursor"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_page_built_by_one_instance_is_served_by_another_without_a_catalog_read() {
    let env = Env::start(Backend::Pg);
    let pg = env.pg.as_ref().expect("pg");
    let b = CloudProcess::start_with(Some(&pg.url), NO_LIMITS).expect("second cloud");
    let a = &env.cloud;
    let (_, north) = env.terminal("north");
    let (_, north2) = env.terminal("north");
    let (_, south) = env.terminal("south");
    let rows: Vec<Value> = (0..5)
        .map(|i| serde_json::json!({"type": "product", "id": format!("p{i}"), "data": {"n": i}}))
        .collect();
    env.admin_upsert(Value::Array(rows)).await;

    // North's first snapshot through A: three pages, each built from the catalog once.
    let mut cursor = None;
    for _ in 0..3 {
        cursor = snapshot_page(a, &north, cursor.as_deref()).await;
    }
    assert!(cursor.is_none(), "5 entities in pages of 2");
    assert_eq!(metric(a, "snapshot_page_reads_total").await, 3.0);

    // Another north till through B: B holds nothing in memory, finds every page in the store.
    let mut cursor = None;
    for _ in 0..3 {
        cursor = snapshot_page(&b, &north2, cursor.as_deref()).await;
    }
    assert_eq!(metric(&b, "snapshot_page_reads_total").await, 0.0);
    assert_eq!(metric(&b, "snapshot_page_shared_hits_total").await, 3.0);

    // South's view is another branch: its first page is built (once), not shared.
    snapshot_page(&b, &south, None).await;
    assert_eq!(metric(&b, "snapshot_page_reads_total").await, 1.0);

    // A herd on both instances at once for a page nobody has: built once for the cluster
    // (memory single flight within an instance, the page's advisory lock across them).
    env.admin_upsert(serde_json::json!([{"type": "product", "id": "p8", "data": {"n": 8}}]))
        .await;
    let built_before = metric(a, "snapshot_page_reads_total").await
        + metric(&b, "snapshot_page_reads_total").await;
    let herd: Vec<_> = (0..8)
        .flat_map(|_| [(a, north.clone()), (&b, north2.clone())])
        .map(|(cloud, token)| async move { snapshot_page(cloud, &token, None).await })
        .collect();
    futures::future::join_all(herd).await;
    let built = metric(a, "snapshot_page_reads_total").await
        + metric(&b, "snapshot_page_reads_total").await
        - built_before;
    assert_eq!(built, 1.0, "sixteen requests on two instances, one build");
    let b_reads = metric(&b, "snapshot_page_reads_total").await;

    // A catalog change is a new version: the page is built again, and the older version's
    // rows leave the store when the new page is stored.
    env.admin_upsert(serde_json::json!([{"type": "product", "id": "p9", "data": {"n": 9}}]))
        .await;
    snapshot_page(&b, &north2, None).await;
    assert_eq!(metric(&b, "snapshot_page_reads_total").await, b_reads + 1.0);
    let versions = pg
        .query_i64("SELECT count(DISTINCT catalog_version) FROM snapshot_page_store")
        .expect("count versions");
    assert_eq!(versions, 1, "only the current version is kept");
}
