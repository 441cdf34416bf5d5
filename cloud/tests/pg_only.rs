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
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(!msg.contains(pg.name()), "no internals leak: {msg}");
}
